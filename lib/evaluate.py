"""Evaluate lumbar spine segmentations against reference masks: per case, per structure, per level.

    python -m lib.evaluate --images DIR --labels DIR (--model FILE | --predictions DIR) --out DIR
                           [--manifest FILE] [--cases ID ...] [--conf KEY VALUE ...] [--slice-mm MM]

``--slice-mm 4`` evaluates each scan as a clinical sagittal series of the same anatomy would
give it: scan and reference resampled onto sagittal slices MM mm apart and thick, 0.6 mm in-plane
(:func:`as_sagittal_series`), scored on that grid.

What is measured (per case and per structure: L1..L5, the five discs L1-L2..L5-S1, the canal;
values and names come from :mod:`lib.pipeline.labels`):

* **Dice** (:mod:`lib.pipeline.metrics`, the project's one Dice), no unit, 0..1.
* **HD95**: 95th-percentile symmetric Hausdorff distance (``compute_hausdorff_distance``
  with ``percentile=95``: the larger of the two directed 95th percentiles), in **mm**.
* **ASSD**: average symmetric surface distance (``compute_average_surface_distance`` with
  ``symmetric=True``: the mean over the boundary voxels of both masks), in **mm**.
  Distances are taken in the scan's physical space: the voxel spacing is the norm of each
  column of the label's affine, so anisotropic scans (3-4 mm sagittal slices) are right.
* **Sensitivity** (recall): fraction of the reference voxels of a structure that the
  prediction gives the same label. It is the headline number for vertebrae of
  ``body_only`` sets (see below) and is reported for every structure.
* **Level identification**: for each reference vertebra (disc) present, the label that the
  majority of the *predicted vertebra* (*disc*) voxels inside it carry; correct when that
  label is the reference level (a tie, or no vertebra/disc predicted inside, is wrong).
  Per case: the fraction correct; overall: the fraction over all structures of all cases.
* **Flags** per case: ``missing`` (in the reference, nothing predicted), ``false_positive``
  (predicted, absent from the reference), ``empty_predicted`` (annotated structure with no
  predicted voxel), ``duplicated`` (a predicted vertebra or disc level that is the majority
  label inside two or more reference structures, e.g. "L2" over both L2 and L3; or that is
  present as two substantial pieces at different heights: cranio-caudal extents overlapping
  by less than 10 %, each piece at least 0.3 mL and 10 % of the label's volume).

Rules:

* Reference voxels equal to 255 (:data:`lib.pipeline.labels.IGNORE_VALUE`) are excluded from every
  metric: they are set to background in both the reference and the prediction first.
* Partial annotation: only structures listed in the case's ``annotated_labels`` (manifest)
  are scored, and the prediction's other labels are ignored (set to background), so that
  e.g. predicted vertebrae in a disc-only set are not false positives. Without a manifest
  (or for a case not in it) every structure is considered annotated, whole vertebra.
* Present in the reference, empty prediction: Dice 0, distances NaN, ``missing``.
  Absent from the reference, predicted: Dice 0, distances NaN, ``false_positive``.
  Absent from both: not scored (NaN, left out of every mean).
* ``vertebra_extent: body_only`` (fastcleverseg VB2/VB3: vertebral bodies only): a
  whole-vertebra prediction overlaps such a mask poorly by design, so vertebrae get
  sensitivity and level identification only (Dice/HD95/ASSD NaN); discs/canal as usual.

Outputs in ``--out``: ``summary.json``, ``per_case.csv`` (one row per case x structure),
``report.md``, ``dice_distribution.png``, ``overlay_best.png``, ``overlay_worst.png`` (and
``predictions/`` with ``--model``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from lib.pipeline.errors import SpineError
from lib.pipeline.io import AFFINE_TOLERANCE_MM, image_id, read_volume, scan_extension
from lib.pipeline.labels import BACKGROUND, CANAL, COLORS, DISCS, IGNORE_VALUE, NAMES, NUM_CLASSES, STRUCTURES, VERTEBRAE
from lib.pipeline.metrics import binary_dice

#: the 11 scored structures, in label order
STRUCTURE_VALUES: Tuple[int, ...] = tuple(s.value for s in STRUCTURES if s.value != BACKGROUND)
KIND: Dict[int, str] = {s.value: s.kind for s in STRUCTURES}
GROUPS: Dict[str, Tuple[int, ...]] = {"vertebrae": VERTEBRAE, "discs": DISCS, "canal": (CANAL,)}
LABEL_EXTENSIONS: Tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")
PREDICTION_SUFFIXES: Tuple[str, ...] = ("_seg.nii.gz", ".nii.gz")

#: a predicted level whose pieces lie at different heights (see module docstring)
DUPLICATE_MIN_ML = 0.3
DUPLICATE_MIN_FRACTION = 0.1
DUPLICATE_MAX_OVERLAP = 0.1

CSV_COLUMNS = (
    "case", "value", "structure", "kind", "annotated", "body_only", "status", "ref_voxels", "pred_voxels",
    "ref_ml", "pred_ml", "dice", "hd95_mm", "assd_mm", "sensitivity", "level_scored", "level_correct",
    "predicted_level", "duplicated", "reliable",
)


class EvaluationError(ValueError):
    """An input that cannot be evaluated (grid mismatch, unknown values, missing files)."""


# ----------------------------------------------------------------------------------------
# manifest
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseInfo:
    annotated: FrozenSet[int] = frozenset(STRUCTURE_VALUES)
    body_only: bool = False
    reliable: Optional[bool] = None
    in_manifest: bool = False


def case_info_from_entry(entry: Optional[Dict[str, Any]]) -> CaseInfo:
    """Manifest entry (``annotated_labels``, ``vertebra_extent``, ``reliable``) -> :class:`CaseInfo`."""
    if entry is None:
        return CaseInfo()
    annotated = entry.get("annotated_labels")
    annotated = frozenset(int(v) for v in annotated if int(v) in STRUCTURE_VALUES) if annotated is not None \
        else frozenset(STRUCTURE_VALUES)
    extent = str(entry.get("vertebra_extent") or "").strip().lower().replace(" ", "_").replace("-", "_")
    reliable = entry.get("reliable")
    return CaseInfo(annotated, extent == "body_only", None if reliable is None else bool(reliable), True)


def load_manifest(path: Optional[str | os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """``{"cases": [{"id": ...}, ...]}``, a list of such entries, or ``{id: entry}`` -> ``{id: entry}``."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise EvaluationError(f"manifest {path}: cannot read ({e})") from None
    if isinstance(data, dict) and "cases" in data:
        data = data["cases"]
    if isinstance(data, list):
        return {str(e["id"]): e for e in data}
    if isinstance(data, dict):
        return {str(k): dict(v, id=k) for k, v in data.items()}
    raise EvaluationError(f"{path}: unrecognised manifest layout")


def reliable_ids(data: str | os.PathLike, prefix: str = "spider_") -> List[str]:
    """Sorted ids of ``data/manifest.json`` marked ``reliable`` whose id starts with ``prefix``
    (default: the SPIDER scans, whole vertebrae with all 11 structures annotated)."""
    return sorted(i for i, entry in load_manifest(Path(data) / "manifest.json").items()
                  if i.startswith(prefix) and entry.get("reliable"))


def find_manifest(labels_dir: Path) -> Optional[Path]:
    for candidate in (labels_dir.parent / "manifest.json", labels_dir / "manifest.json"):
        if candidate.is_file():
            return candidate
    return None


# ----------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------
def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (norm of the affine's columns)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def check_grid(pred_shape, pred_affine, ref_shape, ref_affine, case: str = "") -> None:
    prefix = f"{case}: " if case else ""
    if tuple(pred_shape) != tuple(ref_shape):
        raise EvaluationError(f"{prefix}prediction shape {tuple(pred_shape)} differs from the reference label "
                              f"shape {tuple(ref_shape)}: the prediction must lie on the label's voxel grid")
    if pred_affine is not None and ref_affine is not None and \
            not np.allclose(pred_affine, ref_affine, atol=AFFINE_TOLERANCE_MM):
        raise EvaluationError(f"{prefix}prediction affine differs from the reference label's (origin, spacing or "
                              f"direction): {np.round(pred_affine, 3).tolist()} vs {np.round(ref_affine, 3).tolist()}")


def _union_box(a: Optional[Tuple[slice, ...]], b: Optional[Tuple[slice, ...]]) -> Optional[Tuple[slice, ...]]:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _boxes(label: np.ndarray) -> Dict[int, Tuple[slice, ...]]:
    """Bounding box of each value 1..11 in one pass (values absent are left out)."""
    found = ndi.find_objects(label, max_label=NUM_CLASSES - 1)
    return {v: box for v, box in enumerate(found, start=1) if box is not None}


def _distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Tuple[float, float, float]:
    """Dice, HD95 (mm), ASSD (mm) of two non-empty binary masks with MONAI's metrics."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    r = torch.from_numpy(np.ascontiguousarray(ref))[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0, 0])
        assd = float(compute_average_surface_distance(p, r, include_background=True, symmetric=True,
                                                      spacing=spacing)[0, 0])
    return binary_dice(pred, ref), hd95, assd


def _world_z_range(box: Tuple[slice, ...], affine: np.ndarray) -> Tuple[float, float]:
    """Cranio-caudal (RAS z) extent in mm of a voxel box, from its 8 corners."""
    corners = np.array(np.meshgrid(*[(s.start - 0.5, s.stop - 0.5) for s in box], indexing="ij")).reshape(3, -1)
    z = affine[2, :3] @ corners + affine[2, 3]
    return float(z.min()), float(z.max())


def _is_duplicated(mask: np.ndarray, offset: Sequence[int], affine: np.ndarray, voxel_ml: float) -> bool:
    """Two substantial pieces of one predicted level at different heights."""
    components, n = ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n < 2:
        return False
    sizes = np.bincount(components.ravel())[1:]
    min_voxels = max(DUPLICATE_MIN_ML / voxel_ml, DUPLICATE_MIN_FRACTION * sizes.sum())
    big = [i for i in np.argsort(-sizes) if sizes[i] >= min_voxels]
    if len(big) < 2:
        return False
    boxes = ndi.find_objects(components)
    ranges = []
    for i in big:
        box = tuple(slice(s.start + o, s.stop + o) for s, o in zip(boxes[i], offset))
        ranges.append(_world_z_range(box, affine))
    for a in range(len(ranges)):
        for b in range(a + 1, len(ranges)):
            (lo1, hi1), (lo2, hi2) = ranges[a], ranges[b]
            overlap = max(0.0, min(hi1, hi2) - max(lo1, lo2))
            if overlap < DUPLICATE_MAX_OVERLAP * min(hi1 - lo1, hi2 - lo2):
                return True
    return False


ALLOWED_REFERENCE = frozenset(range(NUM_CLASSES)) | {IGNORE_VALUE}
ALLOWED_PREDICTION = frozenset(range(NUM_CLASSES))


def as_label_array(array: np.ndarray, what: str, allowed: FrozenSet[int], case: str = "case") -> np.ndarray:
    """Check that a label map holds only ``allowed`` integer values; return it as uint8 (no sort: bincount)."""
    array = np.asarray(array)
    if array.dtype.kind == "f":
        rounded = np.rint(array)
        if np.any(rounded != array):
            raise EvaluationError(f"{case}: {what} has non-integer values")
        array = rounded
    elif array.dtype.kind not in "iub":
        raise EvaluationError(f"{case}: {what} has dtype {array.dtype}, expected integer label values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise EvaluationError(f"{case}: {what} has values outside {sorted(allowed)} "
                              f"(min {array.min()}, max {array.max()})")
    array = array.astype(np.uint8, copy=False)
    present = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    bad = [int(v) for v in present if int(v) not in allowed]
    if bad:
        raise EvaluationError(f"{case}: {what} has values {bad[:10]} outside {sorted(allowed)}")
    return array


class _torch_threads:
    """Run MONAI's metric code single-threaded: the masks are small crops, and extra intra-op threads
    only fight over the CPU (3x slower on a 2-core machine that is also training)."""

    def __init__(self, n: int = 1):
        self.n = n

    def __enter__(self):
        import torch

        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.previous)


def _nan() -> float:
    return float("nan")


def _score_structure(v: int, ref: np.ndarray, pred: np.ndarray, ref_boxes, pred_boxes, affine: np.ndarray,
                     spacing: np.ndarray, voxel_ml: float, info: CaseInfo, case: str) -> Dict[str, Any]:
    """One row of ``per_case.csv``: the metrics of structure ``v`` (see the module docstring)."""
    kind = KIND[v]
    body_only = info.body_only and kind == "vertebra"
    row: Dict[str, Any] = {
        "case": case, "value": v, "structure": NAMES[v], "kind": kind, "annotated": v in info.annotated,
        "body_only": body_only, "status": "not_annotated", "ref_voxels": 0, "pred_voxels": 0,
        "ref_ml": 0.0, "pred_ml": 0.0, "dice": _nan(), "hd95_mm": _nan(), "assd_mm": _nan(),
        "sensitivity": _nan(), "level_scored": False, "level_correct": None, "predicted_level": "",
        "duplicated": False, "reliable": info.reliable,
    }
    if v not in info.annotated:
        return row
    box = _union_box(ref_boxes.get(v), pred_boxes.get(v))
    if box is None:
        row["status"] = "absent"
        return row
    r = ref[box] == v
    p = pred[box] == v
    n_ref, n_pred = int(r.sum()), int(p.sum())
    row.update(ref_voxels=n_ref, pred_voxels=n_pred, ref_ml=n_ref * voxel_ml, pred_ml=n_pred * voxel_ml)
    if n_ref and n_pred:
        row["status"] = "ok"
        row["sensitivity"] = float(np.count_nonzero(r & p)) / n_ref
        if not body_only:
            row["dice"], row["hd95_mm"], row["assd_mm"] = _distances(p, r, spacing)
    elif n_ref:
        row["status"] = "missing"
        row["sensitivity"] = 0.0
        if not body_only:
            row["dice"] = binary_dice(p, r)  # 0 by lib.pipeline.metrics' rules
    else:
        row["status"] = "false_positive"
        if not body_only:
            row["dice"] = binary_dice(p, r)  # 0 by lib.pipeline.metrics' rules
    if n_pred and kind in ("vertebra", "disc"):
        pbox = pred_boxes[v]
        row["duplicated"] = _is_duplicated(pred[pbox] == v, [s.start for s in pbox], affine, voxel_ml)
    if n_ref and kind in ("vertebra", "disc"):
        same_kind = VERTEBRAE if kind == "vertebra" else DISCS
        inside = pred[box][r]
        counts = np.bincount(inside, minlength=NUM_CLASSES)[list(same_kind)]
        row["level_scored"] = True
        if counts.sum() == 0:
            row["level_correct"] = False
        else:
            best = int(np.argmax(counts))
            row["predicted_level"] = NAMES[same_kind[best]]
            row["level_correct"] = bool(same_kind[best] == v and np.count_nonzero(counts == counts[best]) == 1)
    return row


def evaluate_case(reference: np.ndarray, prediction: np.ndarray, affine: np.ndarray,
                  info: CaseInfo = CaseInfo(), case: str = "case",
                  prediction_affine: Optional[np.ndarray] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Score one prediction against its reference on the same voxel grid.

    ``reference``: values 0..11 and 255 (ignore); ``prediction``: values 0..11; ``affine``:
    the reference's 4x4 voxel -> RAS mm matrix. Returns ``(rows, case_summary)``: one row per
    structure (see ``CSV_COLUMNS``) and the per-case figures.
    """
    start = time.perf_counter()
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    affine = np.asarray(affine, dtype=np.float64)
    check_grid(prediction.shape, prediction_affine, reference.shape, affine if prediction_affine is not None else None,
               case)
    if reference.ndim != 3:
        raise EvaluationError(f"{case}: expected 3D volumes, got shape {reference.shape}")
    reference = as_label_array(reference, "reference", ALLOWED_REFERENCE, case)
    prediction = as_label_array(prediction, "prediction", ALLOWED_PREDICTION, case)

    ignore = reference == IGNORE_VALUE
    ref = np.where(ignore, BACKGROUND, reference).astype(np.uint8)
    keep = np.zeros(256, dtype=bool)
    keep[sorted(info.annotated)] = True
    pred = np.where(keep[prediction] & ~ignore, prediction, BACKGROUND).astype(np.uint8)

    spacing = voxel_spacing(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref_boxes, pred_boxes = _boxes(ref), _boxes(pred)
    rows: List[Dict[str, Any]] = []
    with _torch_threads(1):
        for v in STRUCTURE_VALUES:
            rows.append(_score_structure(v, ref, pred, ref_boxes, pred_boxes, affine, spacing, voxel_ml, info, case))

    scored_levels = [r for r in rows if r["level_scored"]]
    # a predicted level that is the majority inside two or more reference levels is duplicated
    # (adjacent vertebrae touch at the facet joints, so this is not seen as separate pieces)
    majority = [r["predicted_level"] for r in scored_levels if r["predicted_level"]]
    for r in rows:
        if majority.count(r["structure"]) >= 2:
            r["duplicated"] = True
    dice_values = [r["dice"] for r in rows if not math.isnan(r["dice"])]
    sens_values = [r["sensitivity"] for r in rows if not math.isnan(r["sensitivity"])]
    summary = {
        "case": case,
        "annotated_labels": sorted(info.annotated),
        "body_only": info.body_only,
        "reliable": info.reliable,
        "in_manifest": info.in_manifest,
        "spacing_mm": [round(float(s), 5) for s in spacing],
        "ignored_voxels": int(ignore.sum()),
        "mean_dice": float(np.mean(dice_values)) if dice_values else _nan(),
        "mean_sensitivity": float(np.mean(sens_values)) if sens_values else _nan(),
        "level_correct": sum(bool(r["level_correct"]) for r in scored_levels),
        "level_total": len(scored_levels),
        "level_accuracy": (sum(bool(r["level_correct"]) for r in scored_levels) / len(scored_levels))
        if scored_levels else _nan(),
        "wrong_levels": [r["structure"] + (f" (as {r['predicted_level']})" if r["predicted_level"] else " (none)")
                         for r in scored_levels if not r["level_correct"]],
        "missing": [r["structure"] for r in rows if r["status"] == "missing"],
        "false_positive": [r["structure"] for r in rows if r["status"] == "false_positive"],
        "empty_predicted": [r["structure"] for r in rows if r["annotated"] and r["pred_voxels"] == 0],
        "duplicated": [r["structure"] for r in rows if r["duplicated"]],
        "seconds": round(time.perf_counter() - start, 3),
    }
    return rows, summary


# ----------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------
def _stats(values: Sequence[float]) -> Dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": None, "sd": None, "median": None, "min": None, "max": None}
    return {"n": int(arr.size), "mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


def _level_stats(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    scored = [r for r in rows if r["level_scored"]]
    correct = sum(bool(r["level_correct"]) for r in scored)
    return {"correct": correct, "total": len(scored), "accuracy": correct / len(scored) if scored else None}


def _group_stats(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    whole = [r for r in rows if not r["body_only"]]
    body = [r for r in rows if r["body_only"]]
    return {
        "dice": _stats([r["dice"] for r in whole]),
        "hd95_mm": _stats([r["hd95_mm"] for r in whole]),
        "assd_mm": _stats([r["assd_mm"] for r in whole]),
        "sensitivity": _stats([r["sensitivity"] for r in whole]),
        "body_only_sensitivity": _stats([r["sensitivity"] for r in body]),
        "level_identification": _level_stats(rows),
        "missing": sum(r["status"] == "missing" for r in rows),
        "false_positive": sum(r["status"] == "false_positive" for r in rows),
        "duplicated": sum(bool(r["duplicated"]) for r in rows),
        "reference_present": sum(r["ref_voxels"] > 0 for r in rows),
    }


def aggregate(rows: Sequence[Dict[str, Any]], cases: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    per_structure = {NAMES[v]: dict(value=v, **_group_stats([r for r in rows if r["value"] == v]))
                     for v in STRUCTURE_VALUES}
    groups = {name: _group_stats([r for r in rows if r["value"] in values]) for name, values in GROUPS.items()}
    return {
        "per_structure": per_structure,
        "groups": groups,
        "level_identification": _level_stats(rows),
        "counts": {
            "cases": len(cases),
            "body_only_cases": sum(bool(c["body_only"]) for c in cases),
            "unreliable_cases": [c["case"] for c in cases if c["reliable"] is False],
            "cases_not_in_manifest": [c["case"] for c in cases if not c["in_manifest"]],
            "structures_scored": sum(r["status"] in ("ok", "missing", "false_positive") for r in rows),
            "missing": sum(r["status"] == "missing" for r in rows),
            "false_positive": sum(r["status"] == "false_positive" for r in rows),
            "duplicated": sum(bool(r["duplicated"]) for r in rows),
            "cases_with_missing": [c["case"] for c in cases if c["missing"]],
            "cases_with_duplicated": [c["case"] for c in cases if c["duplicated"]],
        },
        "mean_case_dice": _stats([c["mean_dice"] for c in cases]),
        "cases": list(cases),
    }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) or math.isinf(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------
def write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            out = {}
            for k in CSV_COLUMNS:
                v = r[k]
                if isinstance(v, float):
                    v = "" if math.isnan(v) else f"{v:.6g}"
                elif v is None:
                    v = ""
                out[k] = v
            writer.writerow(out)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_sd(s: Dict[str, Any], digits: int = 3) -> str:
    return "–" if not s["n"] else f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def _level_text(s: Dict[str, Any]) -> str:
    return "–" if not s["total"] else f"{s['accuracy']:.3f} ({s['correct']}/{s['total']})"


def write_report(summary: Dict[str, Any], path: Path) -> None:
    lines = ["# Lumbar spine segmentation: evaluation", ""]
    counts = summary["counts"]
    lines += [f"{counts['cases']} case(s); command: `{summary['arguments']['command']}`", "",
              "Dice is unitless; HD95 (95th-percentile symmetric Hausdorff distance) and ASSD (average symmetric "
              "surface distance) are in mm, in the scan's physical space. Mean ± sd over the cases where the "
              "structure is scored (n); median in brackets.", "",
              "## Per structure", "",
              "| structure | n | Dice mean ± sd (median) | HD95 mm mean (median) | ASSD mm mean (median) | "
              "body-only sensitivity | level accuracy | missing | false pos. | duplicated |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary["per_structure"].items():
        d, h, a, b = s["dice"], s["hd95_mm"], s["assd_mm"], s["body_only_sensitivity"]
        body_text = "–" if not b["n"] else f"{_mean_sd(b)} (n={b['n']})"
        lines.append(
            f"| {name} | {d['n']} | {_mean_sd(d)} ({_fmt(d['median'])}) | "
            f"{_fmt(h['mean'], 2)} ({_fmt(h['median'], 2)}) | {_fmt(a['mean'], 2)} ({_fmt(a['median'], 2)}) | "
            f"{body_text} | {_level_text(s['level_identification'])} | "
            f"{s['missing']} | {s['false_positive']} | {s['duplicated']} |")
    lines += ["", "## Per group", "",
              "| group | n | Dice mean ± sd (median) | HD95 mm mean (median) | ASSD mm mean (median) | "
              "body-only sensitivity | level accuracy |", "|---|---|---|---|---|---|---|"]
    for name, s in summary["groups"].items():
        d, h, a, b = s["dice"], s["hd95_mm"], s["assd_mm"], s["body_only_sensitivity"]
        lines.append(f"| {name} | {d['n']} | {_mean_sd(d)} ({_fmt(d['median'])}) | {_fmt(h['mean'], 2)} "
                     f"({_fmt(h['median'], 2)}) | {_fmt(a['mean'], 2)} ({_fmt(a['median'], 2)}) | "
                     f"{_mean_sd(b) if b['n'] else '–'} | {_level_text(s['level_identification'])} |")
    level = summary["level_identification"]
    lines += ["", "## Level identification", "",
              f"Overall: **{_level_text(level)}** of the reference vertebrae and discs have the right level "
              "(majority of the predicted vertebra, resp. disc, voxels inside each reference structure).", "",
              "## Per case", "",
              "| case | mean Dice | level accuracy | wrong levels | missing | duplicated | false positives | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for c in summary["cases"]:
        notes = []
        if c["body_only"]:
            notes.append("body-only vertebrae")
        if c["reliable"] is False:
            notes.append("unreliable reference")
        if len(c["annotated_labels"]) < len(STRUCTURE_VALUES):
            notes.append("annotated: " + ", ".join(NAMES[v] for v in c["annotated_labels"]))
        acc = c["level_accuracy"]
        acc_text = "–" if acc is None else f"{acc:.3f} ({c['level_correct']}/{c['level_total']})"
        lines.append(f"| {c['case']} | {_fmt(c['mean_dice'])} | {acc_text} | "
                     f"{', '.join(c['wrong_levels']) or '–'} | {', '.join(c['missing']) or '–'} | "
                     f"{', '.join(c['duplicated']) or '–'} | {', '.join(c['false_positive']) or '–'} | "
                     f"{'; '.join(notes) or '–'} |")
    lines += ["", "## Notes", "",
              "- Reference voxels of value 255 (ignore) are set to background in both reference and prediction "
              "before any metric.",
              "- Only the structures listed in a case's `annotated_labels` are scored; the prediction's other "
              "labels are ignored there, so they are not false positives.",
              "- A structure in the reference with an empty prediction counts Dice 0 and as *missing* (distances "
              "not defined); predicted but absent from the reference: Dice 0, *false positive*; absent from both: "
              "not scored."]
    if counts["body_only_cases"]:
        lines.append(f"- {counts['body_only_cases']} case(s) have body-only vertebra masks (`vertebra_extent: "
                     "body_only`, e.g. fastcleverseg VB2/VB3): a whole-vertebra prediction (body + posterior "
                     "elements) overlaps them poorly by design, so their vertebrae are scored by *sensitivity* "
                     "(fraction of the reference body covered by the prediction of the same level) and level "
                     "identification only, never Dice/HD95/ASSD.")
    if counts["unreliable_cases"]:
        lines.append(f"- Cases with an unreliable reference (manifest `reliable: false`): "
                     f"{', '.join(counts['unreliable_cases'])}. They are included in the figures above.")
    if counts["cases_not_in_manifest"]:
        lines.append(f"- Not in the manifest (every structure treated as annotated, whole vertebra): "
                     f"{', '.join(counts['cases_not_in_manifest'])}.")
    if summary.get("overlays"):
        lines.append("- Overlays (mid-sagittal slice; reference contours, prediction filled): " + ", ".join(
            f"`{k}.png` = {v}" for k, v in summary["overlays"].items()))
    lines.append("")
    path.write_text("\n".join(lines))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _points(ax, values: Sequence[Sequence[float]], positions: Sequence[int]) -> None:
    """Every case as a dot over its box (jittered sideways, fixed seed)."""
    rng = np.random.default_rng(0)
    for vals, x in zip(values, positions):
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(vals)), vals, s=8, color="black", alpha=0.6, zorder=3)


def plot_distribution(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    dice = [[r["dice"] for r in rows if r["value"] == v and not r["body_only"] and not math.isnan(r["dice"])]
            for v in STRUCTURE_VALUES]
    body = [[r["sensitivity"] for r in rows if r["value"] == v and r["body_only"] and not math.isnan(r["sensitivity"])]
            for v in VERTEBRAE]
    panels = 2 if any(body) else 1
    fig, axes = plt.subplots(1, panels, figsize=(10 + 3 * (panels - 1), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [11, 5][:panels]})
    ax = axes[0, 0]
    names = [NAMES[v] for v in STRUCTURE_VALUES]
    positions = [i for i, d in enumerate(dice, start=1) if d]
    if positions:
        box = ax.boxplot([d for d in dice if d], positions=positions, widths=0.6, patch_artist=True)
        for patch, i in zip(box["boxes"], positions):
            patch.set_facecolor(np.array(COLORS[names[i - 1]]) / 255.0)
        _points(ax, [d for d in dice if d], positions)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
    ax.set_xlim(0.4, len(names) + 0.6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Dice per structure" + (" (whole-vertebra references)" if panels == 2 else ""))
    ax.grid(axis="y", alpha=0.3)
    if panels == 2:
        ax = axes[0, 1]
        positions = [i for i, d in enumerate(body, start=1) if d]
        ax.boxplot([d for d in body if d], positions=positions, widths=0.6)
        _points(ax, [d for d in body if d], positions)
        ax.set_xticks(range(1, len(VERTEBRAE) + 1), [NAMES[v] for v in VERTEBRAE])
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("sensitivity")
        ax.set_title("Body-only vertebrae: sensitivity")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sagittal_axis(affine: np.ndarray) -> int:
    """Array axis running left-right (its nibabel axis code is L or R)."""
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    return next(i for i, c in enumerate(codes) if c in ("L", "R"))


def _sagittal_slice(volumes: Sequence[np.ndarray], affine: np.ndarray, index: int):
    """The same sagittal slice of each volume as 2D arrays: rows superior->inferior, columns anterior->posterior."""
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    sag = sagittal_axis(affine)
    rest = [i for i in range(3) if i != sag]
    si = next(i for i in rest if codes[i] in ("S", "I"))
    ap = next(i for i in rest if i != si)
    out = []
    for vol in volumes:
        s = np.take(vol, index, axis=sag)
        if rest.index(si) == 1:
            s = s.T
        if codes[si] == "S":
            s = s[::-1]
        if codes[ap] == "A":
            s = s[:, ::-1]
        out.append(s)
    spacing = voxel_spacing(affine)
    return out, float(spacing[si]), float(spacing[ap])


def plot_overlay(image: Optional[np.ndarray], reference: np.ndarray, prediction: np.ndarray, affine: np.ndarray,
                 path: Path, title: str, names: Tuple[str, str] = ("reference", "prediction")) -> None:
    """Mid-sagittal slice: image, reference contours (label colours), prediction filled (label colours);
    ``names``: what the two label maps are called in the panel titles."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    sag = sagittal_axis(affine)
    annotated = (reference > 0) & (reference != IGNORE_VALUE)
    if annotated.any():
        other = tuple(i for i in range(3) if i != sag)
        profile = annotated.sum(axis=other)
        index = int(np.round(np.average(np.arange(profile.size), weights=profile)))
    else:
        index = reference.shape[sag] // 2
    if image is None or image.shape != reference.shape:
        image = np.zeros(reference.shape, dtype=np.float32)
    (img, ref, pred), row_mm, col_mm = _sagittal_slice([image, reference, prediction], affine, index)
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
    colours = np.zeros((256, 4), dtype=np.float32)
    for s in STRUCTURES[1:]:
        colours[s.value, :3] = np.array(s.color) / 255.0
        colours[s.value, 3] = 0.45
    fig, axes = plt.subplots(1, 2, figsize=(10, 7))
    for ax in axes:
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=row_mm / col_mm,
                  interpolation="nearest")
        ax.set_axis_off()
    axes[1].imshow(colours[np.clip(pred, 0, 255).astype(np.uint8)], aspect=row_mm / col_mm, interpolation="nearest")
    for v in STRUCTURE_VALUES:
        if (ref == v).any():
            colour = np.array(STRUCTURES[v].color) / 255.0
            for ax in axes:
                ax.contour((ref == v).astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.9)
    if (ref == IGNORE_VALUE).any():
        axes[0].contour((ref == IGNORE_VALUE).astype(np.float32), levels=[0.5], colors=["white"], linewidths=0.6,
                        linestyles="dotted")
    axes[0].set_title(f"image + {names[0]} contours")
    axes[1].set_title(f"{names[1]} (filled) + {names[0]} contours")
    handles = [Patch(color=np.array(s.color) / 255.0, label=s.name) for s in STRUCTURES[1:]]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\nsagittal slice {index} (axis {sag}); superior up, anterior left")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# files and command line
# ----------------------------------------------------------------------------------------
def case_id_of(path: Path) -> Optional[str]:
    """The case id of a label file (:func:`lib.pipeline.io.image_id`); None for other files."""
    return image_id(path.name) if scan_extension(path.name) in LABEL_EXTENSIONS else None


def list_label_files(labels_dir: Path) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for p in sorted(labels_dir.iterdir()):
        cid = case_id_of(p) if p.is_file() else None
        if cid is not None and not p.name.startswith("."):
            if cid in found:
                raise EvaluationError(f"two label files for case {cid}: {found[cid].name} and {p.name}")
            found[cid] = p
    return found


def find_image(images_dir: Path, case: str) -> Optional[Path]:
    for ext in LABEL_EXTENSIONS + (".mhd",):
        p = images_dir / f"{case}{ext}"
        if p.is_file():
            return p
    return None


def find_prediction(predictions_dir: Path, case: str) -> Optional[Path]:
    for suffix in PREDICTION_SUFFIXES:
        p = predictions_dir / f"{case}{suffix}"
        if p.is_file():
            return p
    return None


def _overlay_case(out: Path, name: str, case: Dict[str, Any], images: Path, labels: Dict[str, Path],
                  predictions: Dict[str, Path]) -> None:
    cid = case["case"]
    reference, affine = read_volume(labels[cid])
    prediction, _ = read_volume(predictions[cid])
    image_path = find_image(images, cid)
    image = read_volume(image_path)[0] if image_path else None
    dice, sens, acc = case["mean_dice"], case["mean_sensitivity"], case["level_accuracy"]
    score = f"mean Dice {dice:.3f}" if dice is not None else \
        (f"mean sensitivity {sens:.3f}" if sens is not None else "no score")
    acc_text = "–" if acc is None else f"{acc:.2f}"
    title = f"{name.replace('_', ' ')}: {cid} ({score}; level accuracy {acc_text})"
    plot_overlay(image, reference.astype(np.int32), prediction.astype(np.int32), affine, out / f"{name}.png", title)


def run(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    images, labels_dir, out = Path(args.images), Path(args.labels), Path(args.out)
    if not labels_dir.is_dir():
        raise EvaluationError(f"--labels {labels_dir}: not a folder")
    if not images.is_dir():
        raise EvaluationError(f"--images {images}: not a folder")
    labels = list_label_files(labels_dir)
    if args.cases:
        unknown = [c for c in args.cases if c not in labels]
        if unknown:
            raise EvaluationError(f"no label file for case(s) {unknown} in {labels_dir}")
        labels = {c: labels[c] for c in args.cases}
    if not labels:
        raise EvaluationError(f"no label files ({', '.join(LABEL_EXTENSIONS)}) in {labels_dir}")
    manifest_path = Path(args.manifest) if args.manifest else find_manifest(labels_dir)
    manifest = load_manifest(manifest_path)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(args, "slice_mm", None) is not None:
        if args.predictions:
            raise EvaluationError("--slice-mm needs --model: the predictions are made on the resampled series")
        images, labels = as_sagittal_series(images, labels, out / f"series_{args.slice_mm:g}mm", args.slice_mm)

    predictions: Dict[str, Path] = {}
    segmenter = None
    if args.predictions:
        pred_dir = Path(args.predictions)
        missing = [c for c in labels if find_prediction(pred_dir, c) is None]
        if missing:
            raise EvaluationError(f"no prediction ({' or '.join('<id>' + s for s in PREDICTION_SUFFIXES)}) in "
                                  f"{pred_dir} for case(s): {', '.join(missing)}")
        predictions = {c: find_prediction(pred_dir, c) for c in labels}
    else:
        missing = [c for c in labels if find_image(images, c) is None]
        if missing:
            raise EvaluationError(f"no image in {images} for case(s): {', '.join(missing)}")
        from lib.segment import SpineSegmenter

        segmenter = SpineSegmenter(args.model, dict(args.conf or []), getattr(args, "device", None))
        (out / "predictions").mkdir(exist_ok=True)

    rows: List[Dict[str, Any]] = []
    cases: List[Dict[str, Any]] = []
    for cid, label_path in labels.items():
        reference, ref_affine = read_volume(label_path)
        if segmenter is not None:
            target = out / "predictions" / f"{cid}_seg.nii.gz"
            t0 = time.perf_counter()
            result = segmenter.segment(find_image(images, cid), target)
            with open(out / "predictions" / f"{cid}_seg.json", "w") as f:
                json.dump(result.report, f, indent=1, default=str)
            prediction, pred_affine = result.label, result.affine
            predictions[cid] = target
            seg_seconds = time.perf_counter() - t0
        else:
            prediction, pred_affine = read_volume(predictions[cid])
            seg_seconds = None
        check_grid(prediction.shape, pred_affine, reference.shape, ref_affine, cid)
        info = case_info_from_entry(manifest.get(cid))
        case_rows, case_summary = evaluate_case(reference, prediction, ref_affine, info, cid)
        if seg_seconds is not None:
            case_summary["segment_seconds"] = round(seg_seconds, 3)
        rows += case_rows
        cases.append(case_summary)
        level = case_summary["level_accuracy"]
        dice = case_summary["mean_dice"]
        print(f"{cid}: mean Dice {'n/a' if math.isnan(dice) else f'{dice:.3f}'}, level accuracy "
              f"{'n/a' if math.isnan(level) else f'{level:.2f}'}"
              + (f", missing {case_summary['missing']}" if case_summary["missing"] else "")
              + (f", duplicated {case_summary['duplicated']}" if case_summary["duplicated"] else "")
              + f" ({case_summary['seconds']:.1f} s)", file=sys.stderr)

    summary = aggregate(rows, cases)
    summary["arguments"] = {
        "command": "python -m lib.evaluate " + " ".join(argv),
        "argv": list(argv),
        "images": str(images), "labels": str(labels_dir), "predictions": args.predictions, "model": args.model,
        "manifest": str(manifest_path) if manifest_path else None,
        "cases": args.cases, "conf": dict(args.conf or []), "out": str(out),
    }
    summary["units"] = {"dice": "1", "hd95_mm": "mm", "assd_mm": "mm", "sensitivity": "1", "volumes": "mL"}

    ranked = [c for c in cases if not math.isnan(c["mean_dice"])]
    key = lambda c: c["mean_dice"]  # noqa: E731
    if not ranked:  # e.g. only body-only vertebra cases: rank by sensitivity
        ranked = [c for c in cases if not math.isnan(c["mean_sensitivity"])]
        key = lambda c: c["mean_sensitivity"]  # noqa: E731
    if not ranked:
        ranked = list(cases)
        key = lambda c: 0.0  # noqa: E731
    best = max(ranked, key=key)
    worst = min(ranked, key=key)
    summary["overlays"] = {"overlay_best": best["case"], "overlay_worst": worst["case"]}

    summary = _json_safe(summary)
    write_csv(rows, out / "per_case.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_report(summary, out / "report.md")
    plot_distribution(rows, out / "dice_distribution.png")
    for name, case in (("overlay_best", best), ("overlay_worst", worst)):
        _overlay_case(out, name, _json_safe(case), images, labels, predictions)
    return summary


def as_sagittal_series(images: Path, labels: Dict[str, Path], dest: Path,
                       slice_mm: float) -> Tuple[Path, Dict[str, Path]]:
    """Each case's scan and reference resampled as a clinical sagittal series: slices
    ``slice_mm`` apart and as thick, covering the scan's left-right extent, 0.6 mm in-plane
    over 307 mm (the benchmark's full-FOV grid, :func:`lib.benchmark.make_full_fov_scan`:
    scan box-averaged across each slice's thickness then trilinear, reference nearest
    neighbour), into ``dest/images`` and ``dest/labels``. Returns the new
    images folder and ``{case: reference path}``."""
    from lib.benchmark import make_full_fov_scan

    if slice_mm <= 0:
        raise EvaluationError(f"--slice-mm must be positive, got {slice_mm}")
    series: Dict[str, Path] = {}
    for cid, label_path in labels.items():
        source = find_image(images, cid)
        if source is None:
            raise EvaluationError(f"no image in {images} for case {cid}")
        reference, affine = read_volume(label_path)  # the scan's grid
        axis = sagittal_axis(affine)
        width_mm = reference.shape[axis] * float(voxel_spacing(affine)[axis])
        grid = {"shape": (512, 512, max(3, int(math.ceil(width_mm / slice_mm)))), "spacing": (0.6, 0.6, slice_mm)}
        make_full_fov_scan(source, dest / "images" / f"{cid}.nii.gz", thick=True, **grid)
        series[cid] = make_full_fov_scan(label_path, dest / "labels" / f"{cid}.nii.gz", order=0, **grid)
    return dest / "images", series


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--images", required=True, help="folder of scans <id>.nii.gz (also .nii, .nrrd, .mha)")
    parser.add_argument("--labels", required=True, help="folder of reference masks <id>.nii.gz (255 = ignore)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="weights file: segment each image with lib.segment.SpineSegmenter")
    source.add_argument("--predictions", help="folder of predictions <id>_seg.nii.gz or <id>.nii.gz")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--manifest", default=None,
                        help="manifest.json (default: manifest.json next to or inside --labels when present)")
    parser.add_argument("--cases", nargs="+", default=None, metavar="ID", help="evaluate only these case ids")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="plan override for --model, as on the server (e.g. --conf preset tiny)")
    parser.add_argument("--device", default=None, help="cuda or cpu for --model (default: cuda when present)")
    parser.add_argument("--slice-mm", type=float, default=None, metavar="MM",
                        help="with --model: evaluate on each scan resampled as a clinical sagittal series "
                             "of MM mm slices (0.6 mm in-plane), the reference likewise")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        summary = run(args, argv)
    except (EvaluationError, SpineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    accuracy = summary["level_identification"]["accuracy"]
    accuracy_text = "n/a" if accuracy is None else f"{accuracy:.3f}"
    print(f"{summary['counts']['cases']} case(s); level accuracy {accuracy_text}; results in {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
