"""Speed, memory and agreement of the app's infer path against a stock MONAI pipeline.

    python -m lib.benchmark [--model FILE] [--threads 2] [--scans FILE ...] [--fov-source FILE]
                            [--shift-scans FILE ...] [--score-scans FILE ...]
                            [--skip-infer] [--skip-shifts] [--skip-scoring] [--conf KEY VALUE ...]

In one process, with the same weights, on the same real scans:

* **stock**: what MONAI gives a user out of the box for the plan's network: the whole scan
  resampled to the model spacing, MONAI ``sliding_window_inference`` over the whole volume
  (ROI 96x96x96 for the 3D network; the 2.5D network's own window, every sagittal slice x
  160 x 256 mm, for the 2.5D one), overlap 0.25, gaussian blending, sw_batch_size 1, no
  cropping, MONAI's own SwinUNETR attention, logits inverted to the scan grid, then the same
  label decision as the app (the plan's ``label_decision``);
* **app**: ``SpineSegmenter.segment``, the code path of ``/infer/spine`` end to end (load,
  checks, resample, body crop, sliding window with the plan's ROI, inversion, label decision,
  clean-up, level assignment, NIfTI writing), first cold (model construction included,
  as a server's first request), then warm (model already loaded);
* **app steps**: the app with single optimisations turned off (``--conf`` overrides), so
  that each step's time and effect on the output are visible.

Agreement is the mean Dice (:mod:`lib.pipeline.metrics`) over the structures present in either label, after the app's
own clean-up and level assignment are applied to the stock output too (untimed), so that
it measures the pipelines, not the post-processing; the canal's Dice and the whole
foreground's are printed beside it (a weakly trained model's level labels flip with
window placement long before its canal does). Peak memory is the largest resident
set of the process sampled during the call (model and Python included).

Scans: by default a full-field-of-view sagittal T2 of 512 x 512 x 15 voxels at
0.6 x 0.6 x 4 mm, resampled from a development scan of ``../shared/data`` (``--fov-source``;
the development scans are cropped, so voxels outside the source's field of view are 0),
and the SPIDER sample scans of ``sample-data/``. Where the source has reference labels
(``labels/`` beside ``images/``; the default ``fcs_IVD_11`` annotates the five discs with
their levels), they are resampled with it (nearest neighbour) and both outputs are scored
against them with ``lib.evaluate`` (annotated structures only): where the two disagree,
this says which one is right.

Scoring: epistemic (MC-dropout) scores of ``--score-scans`` (default: 12 SPIDER development
scans of ``../shared/data``), by the reference ``full`` computation (``mc_samples``
separate sliding-window passes over the body-cropped scan, as MONAI Label's epistemic
scoring runs them), by the same with other dropout masks (the Monte-Carlo noise: the best
agreement any cheaper computation can show) and by the ``fast`` one (coarse grid, fitted
windows, samples batched), with the cost of each in CPU seconds and the Spearman
correlation of each ranking of the scans with the reference's.

Window dependence: the agreement any fast path can reach that places its windows otherwise
than another pipeline. Per ``--shift-scans`` scan (default: the full-FOV scan and the model
card's 6 validation scans), the app's label on the model grid (its pre-processing, sliding
window, label decision, clean-up and level assignment) with the scan where the app's window
puts it, against the same with the window moved over the anatomy by each of
:data:`WINDOW_SHIFTS_MM` (zeros around the scan, as MONAI's sliding window pads it).

The last line reads ``speedup <stock/app warm, full-FOV scan> agreement <dice>``. ``--out``
gets ``results.json`` and, per scan, ``agreement_<scan>.png``: the mid-sagittal slice with the
app's output as contours and the stock pipeline's filled.
Without trained weights it uses a freshly initialised network: timings hold, agreement
and ranking then mean little.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lib.lifecycle.model_store import DEFAULT_MODEL_DIR, REPO_ROOT, weights_path
from lib.pipeline.errors import PlanMismatch
from lib.pipeline.grouping import decide
from lib.pipeline.labels import NAMES
from lib.pipeline.networks import build_network, check_plan, load_network, sliding_window_inferer
from lib.pipeline.plans import SpinePlan
from lib.tools.measure import MemorySampler

SAMPLE_DATA = REPO_ROOT / "sample-data"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_FOV_SOURCE = SHARED_DATA / "images" / "fcs_IVD_11.nii.gz"
WORK_DIR = REPO_ROOT / "work" / "benchmark"

#: the stock pipeline's window for the 3D network, fixed by definition (not the plan's)
STOCK_ROI_3D = (96, 96, 96)
STOCK_OVERLAP = 0.25
#: steps of the app that can be switched off, as ``--conf`` overrides
APP_STEPS: Dict[str, Dict[str, str]] = {
    "app without fused attention": {"fused_attention": "false"},
    "app with one window per pass": {"sw_batch_size": "1"},
    "app without body crop": {"crop_to_body": "false"},
}
#: where the window is moved over the anatomy (posterior, inferior: mm) from where the app puts
#: it, for :func:`window_shift_agreement`: about the training's jitter (up to 30 mm AP, 50 mm
#: SI); the stock grid lies 26-75 mm from the app's window on the full-FOV scan
WINDOW_SHIFTS_MM: Dict[str, Tuple[float, float]] = {
    "posterior 20 mm": (20.0, 0.0),
    "posterior 40 mm": (40.0, 0.0),
    "inferior 40 mm": (0.0, 40.0),
    "posterior 20, inferior 40 mm": (20.0, 40.0),
}
#: ... and for the 3D network only
APP_STEPS_3D: Dict[str, Dict[str, str]] = {
    "app without body crop, stock 96^3 ROI": {"crop_to_body": "false", "roi_size": "96,96,96"},
}


def stock_roi(plan: SpinePlan) -> Tuple[int, ...]:
    """The stock pipeline's window: 96^3 for the 3D network; the 2.5D network's own window."""
    return STOCK_ROI_3D if plan.network_mode == "3d" else tuple(plan.roi_size)


def app_steps(plan: SpinePlan) -> Dict[str, Dict[str, str]]:
    return {**APP_STEPS, **(APP_STEPS_3D if plan.network_mode == "3d" else {})}


# --- measurement helpers ------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> Tuple[Any, float, float]:
    """Run ``fn``: (its result, wall seconds, peak RSS in MB)."""
    with MemorySampler(os.getpid(), children=False, interval=0.02) as peak:
        start = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
    return result, wall, peak.peak_mb


def cpu_timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """Run ``fn``: (its result, CPU seconds of this process, all threads): the cost of a
    computation, which other load on the machine changes less than wall time."""
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def agreement_report(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    """Dice (:mod:`lib.pipeline.metrics`) of two label maps of one grid: mean over structures, the
    canal's and the whole foreground's; 1.0 where neither map holds anything to compare."""
    from lib.pipeline.labels import CANAL
    from lib.pipeline.metrics import binary_dice, mean_dice

    def agreed(value) -> float:
        return 1.0 if value is None or value != value else float(value)

    return {"mean": agreed(mean_dice(a, b)), "canal": agreed(binary_dice(a == CANAL, b == CANAL)),
            "foreground": agreed(binary_dice(a > 0, b > 0))}


# --- scans ----------------------------------------------------------------------------
def full_fov_grid(affine: np.ndarray, source_shape, shape=(512, 512, 15), spacing=(0.6, 0.6, 4.0)) -> np.ndarray:
    """4x4 voxel -> RAS mm matrix of the full-FOV grid: centred on the source, voxel axes
    anterior->posterior, superior->inferior, right->left (the way a scanner stores a
    sagittal series), ``spacing`` mm."""
    directions = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns P, I, L in RAS
    target = np.eye(4)
    target[:3, :3] = directions * np.asarray(spacing)
    centre = affine[:3, :3] @ ((np.asarray(source_shape) - 1) / 2) + affine[:3, 3]
    target[:3, 3] = centre - target[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return target


def make_full_fov_scan(source: Path, dest: Path, shape=(512, 512, 15), spacing=(0.6, 0.6, 4.0),
                       order: int = 1, thick: bool = False) -> Path:
    """Resample ``source`` onto the full-FOV grid (:func:`full_fov_grid`).

    ``order`` 1 (a scan): trilinear, int16 like the MR it came from; ``order`` 0 (its label
    map): nearest neighbour, uint8. 0 outside the source's field of view. ``thick`` (a scan
    only): each slice is as thick as the slice distance (a box average of the source across
    it, as an MR slice integrates over its thickness) instead of a thin sample.
    """
    import nibabel as nib
    from scipy import ndimage

    from lib.pipeline.io import read_volume

    if dest.exists() and dest.stat().st_mtime >= source.stat().st_mtime:
        return dest
    data, affine = read_volume(source)
    target = full_fov_grid(affine, data.shape, shape, spacing)
    if thick and order:
        # the grid's slices are sagittal: average across the source's left-right axis
        axis = next(i for i, c in enumerate(nib.aff2axcodes(affine)) if c in "LR")
        width = spacing[2] / float(np.linalg.norm(affine[:3, axis]))
        if width > 1:
            data = ndimage.uniform_filter1d(data.astype(np.float32), int(round(width)), axis=axis, mode="nearest")
    voxels = np.indices(shape, dtype=np.float32).reshape(3, -1)
    to_source = np.linalg.inv(affine) @ target
    coords = to_source[:3, :3] @ voxels + to_source[:3, 3:4]
    out = ndimage.map_coordinates(data.astype(np.float32), coords, order=order, cval=0.0).reshape(shape)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if order else np.uint8
    nib.save(nib.Nifti1Image(np.round(out).astype(dtype), target), str(dest))
    return dest


@dataclasses.dataclass(frozen=True)
class Reference:
    """A scan's reference labels (same grid) and which structures they annotate."""
    label: Path
    info: Any  # lib.evaluate.CaseInfo


def full_fov_reference(source: Path, scan: Path, **grid) -> Optional[Reference]:
    """The source's reference labels on the full-FOV grid of ``scan`` (``labels/<id>`` beside
    ``images/``, its ``annotated_labels`` from the data's manifest; ``grid``: ``shape`` and
    ``spacing`` as given to :func:`make_full_fov_scan`), or None where the source has none."""
    from lib.evaluate import case_info_from_entry, find_manifest, load_manifest

    label_source = source.parent.parent / "labels" / source.name
    if not label_source.is_file():
        return None
    label = make_full_fov_scan(label_source, scan.with_name(scan.name.replace(".nii", "_reference.nii")), order=0,
                               **grid)
    manifest = find_manifest(label_source.parent)
    entry = load_manifest(manifest).get(source.name.split(".")[0]) if manifest else None
    return Reference(label, case_info_from_entry(entry))


def reference_dice(prediction: np.ndarray, reference: Reference, affine: np.ndarray) -> Dict[str, Any]:
    """``lib.evaluate`` of one output against the reference: mean Dice over the annotated
    structures (the others are not judged), level identification, what is missing."""
    from lib.evaluate import evaluate_case
    from lib.pipeline.io import read_volume

    ref, _ = read_volume(reference.label)
    _, case = evaluate_case(ref, prediction, affine, reference.info, reference.label.name)
    return {k: case[k] for k in ("mean_dice", "level_correct", "level_total", "wrong_levels", "missing")}


def default_score_scans() -> List[Path]:
    images = SHARED_DATA / "images"
    return sorted(images.glob("spider_*.nii.gz"))[:12] if images.is_dir() else []


# --- pipelines ------------------------------------------------------------------------
class StockPipeline:
    """Resample everything, the stock window (:func:`stock_roi`) over the whole scan, invert, the plan's
    label decision."""

    def __init__(self, network: torch.nn.Module, plan: SpinePlan):
        from monai.transforms import Compose

        from lib.pipeline.transforms import load_and_resample

        self.network, self.plan = network, plan
        self.pre = Compose(load_and_resample(["image"], plan))

    def __call__(self, scan: Path) -> np.ndarray:
        from monai.inferers import sliding_window_inference
        from monai.transforms import Invertd

        data = self.pre({"image": str(scan)})
        with torch.no_grad():
            logits = sliding_window_inference(
                data["image"][None], stock_roi(self.plan), 1, self.network, overlap=STOCK_OVERLAP, mode="gaussian"
            )[0]
        data["pred"] = logits
        data = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False)(data)
        return decide(torch.as_tensor(data["pred"]), self.plan.label_decision).numpy().astype(np.uint8)


# --- window dependence ------------------------------------------------------------------
def place_in_window(volume: torch.Tensor, roi: Sequence[int], offset: Sequence[int]) -> Tuple[torch.Tensor, Tuple[slice, ...]]:
    """``volume`` (N, C, X, Y, Z) placed ``offset`` voxels (>= 0, per spatial axis) into a zero
    canvas at least ``roi`` large (-1: the volume's own size): (canvas, the volume's slices in
    it). Offset 0 on an axis where the volume is smaller than the window puts it where MONAI's
    sliding window pads it (centred); a larger offset moves the window posterior/inferior over it
    in RAS (the window starts at the canvas's first voxel)."""
    size = np.array(volume.shape[2:])
    roi = np.array([s if r <= 0 else r for r, s in zip(roi, size)])
    before = np.maximum(roi - size, 0) // 2 + np.asarray(offset, dtype=int)
    canvas_size = np.maximum(size + before, roi)
    canvas = volume.new_zeros(volume.shape[:2] + tuple(int(c) for c in canvas_size))
    inside = tuple(slice(int(b), int(b + n)) for b, n in zip(before, size))
    canvas[(Ellipsis,) + inside] = volume
    return canvas, inside


def window_shift_agreement(scan: Path, network: torch.nn.Module, plan: SpinePlan,
                           shifts: Dict[str, Tuple[float, float]] = WINDOW_SHIFTS_MM) -> Dict[str, Dict[str, float]]:
    """:func:`agreement_report` of the app's label of ``scan`` with its window where the app puts
    it, against the same with the window moved by each of ``shifts`` ((posterior, inferior)
    mm); labels on the model grid after the app's clean-up and level assignment. A pipeline
    that places its windows otherwise than another cannot agree with it better than this."""
    from monai.transforms import Compose

    from lib.pipeline.levels import finish_label
    from lib.pipeline.transforms import infer_pre_transforms

    image = Compose(infer_pre_transforms(plan))({"image": str(scan)})["image"]
    affine = np.asarray(image.affine)
    volume = image.as_tensor()[None].float()
    inferer = sliding_window_inferer(plan)
    step = np.asarray(plan.target_spacing[1:])

    def label(shift_mm: Tuple[float, float]) -> np.ndarray:
        offset = (0, *np.round(np.asarray(shift_mm) / step).astype(int))
        canvas, inside = place_in_window(volume, plan.roi_size, offset)
        with torch.no_grad():
            logits = inferer(canvas, network)[0][(slice(None),) + inside]
        decided = decide(logits, plan.label_decision).numpy().astype(np.uint8)
        return finish_label(decided, affine, plan.min_island_ml, plan.midline_prior)[0]

    where_the_app_puts_it = label((0.0, 0.0))
    return {name: agreement_report(label(shift), where_the_app_puts_it) for name, shift in shifts.items()}


def benchmark_window_shifts(scans: Sequence[Path], model_path: str, conf: Dict[str, str], log=print) -> Dict[str, Any]:
    """:func:`window_shift_agreement` per scan, and over all scans and shifts the median and the
    smallest of the mean agreements."""
    plan = SpinePlan.from_conf(conf)
    network = load_network(plan, model_path)
    rows: Dict[str, Any] = {}
    for scan in scans:
        rows[scan.name] = window_shift_agreement(scan, network, plan)
        log(f"{scan.name}: window moved, agreement with the app's own placement: " + "; ".join(
            f"{name} {a['mean']:.4f} (canal {a['canal']:.4f}, foreground {a['foreground']:.4f})"
            for name, a in rows[scan.name].items()))
    means = [a["mean"] for row in rows.values() for a in row.values()]
    summary = {"scans": rows, "median": float(np.median(means)), "min": float(np.min(means))}
    log(f"window dependence: {len(rows)} scans x {len(WINDOW_SHIFTS_MM)} shifts, agreement median "
        f"{summary['median']:.4f}, smallest {summary['min']:.4f}")
    return summary


def default_shift_scans() -> List[Path]:
    """The model card's validation scans (never trained on), where present."""
    from lib.train_recipe import VAL_COUNT, choose_cases

    if not (SHARED_DATA / "manifest.json").is_file():
        return []
    return [SHARED_DATA / "images" / f"{case}.nii.gz" for case in choose_cases(SHARED_DATA, VAL_COUNT)[1]]


# --- the run ----------------------------------------------------------------------------
def benchmark_infer(scans: Sequence[Path], model_path: str, conf: Dict[str, str], log=print,
                    figures: Optional[Path] = None,
                    references: Optional[Dict[str, Reference]] = None) -> Dict[str, Any]:
    """Per scan: app cold/warm, app steps, stock (see the module help); with ``figures``, a PNG per
    scan of the two outputs on the mid-sagittal slice (app contours, stock filled); for a scan
    with one of ``references`` (by file name), each output's accuracy against it."""
    from lib.pipeline.io import read_volume
    from lib.pipeline.levels import finish_label
    from lib.segment import SpineSegmenter

    plan = SpinePlan.from_conf(conf)
    results: Dict[str, Any] = {}
    segmenter, cold_wall = None, None
    for scan in scans:
        row: Dict[str, Any] = {}
        if segmenter is None:  # cold: the model is built and loaded inside the first call
            def first():
                nonlocal segmenter
                segmenter = SpineSegmenter(model_path, conf, device="cpu")
                return segmenter.segment(scan)

            _, cold_wall, cold_peak = timed(first)
            row["app_cold_s"], row["app_cold_peak_mb"] = cold_wall, cold_peak
        app, wall, peak = timed(lambda: segmenter.segment(scan))
        row.update({"app_s": wall, "app_peak_mb": peak, "app_stages_s": app.report.get("latencies", {})})
        stages = ", ".join(f"{k} {v:.2f}" for k, v in row["app_stages_s"].items() if isinstance(v, float))
        log(f"{scan.name}: app warm {wall:.2f} s ({stages}; peak RSS {peak:.0f} MB)"
            + (f"; cold {row['app_cold_s']:.2f} s" if "app_cold_s" in row else ""))
        for step, overrides in app_steps(plan).items():
            other, wall_v, peak_v = timed(lambda o=overrides: SpineSegmenter(model_path, {**conf, **o}, "cpu").segment(scan))
            agreement = agreement_report(other.label, app.label)
            row.setdefault("steps", {})[step] = {"s": wall_v, "peak_mb": peak_v, "agreement_with_app": agreement}
            log(f"{scan.name}: {step} {wall_v:.2f} s (model load included), agreement with app "
                f"{agreement['mean']:.4f} (canal {agreement['canal']:.4f}, foreground {agreement['foreground']:.4f})")
        stock_pipeline = StockPipeline(load_network(dataclasses.replace(plan, fused_attention=False), model_path), plan)
        stock, wall_s, peak_s = timed(lambda: stock_pipeline(scan))
        image, affine = read_volume(scan)
        stock = finish_label(stock, affine, plan.min_island_ml, plan.midline_prior)[0]  # the app's clean-up, for a like-for-like agreement
        agreement = agreement_report(stock, app.label)
        if figures is not None:  # where the two outputs differ, on the mid-sagittal slice
            from lib.evaluate import plot_overlay

            figure = figures / f"agreement_{scan.name.split('.')[0]}.png"
            plot_overlay(image, app.label, stock, affine, figure, f"{scan.name}: agreement {agreement['mean']:.3f}",
                         names=("app", "stock"))
            row["figure"] = str(figure)
        row.update({"stock_s": wall_s, "stock_peak_mb": peak_s, "agreement": agreement["mean"],
                    "agreement_detail": agreement, "speedup": wall_s / row["app_s"]})
        log(f"{scan.name}: stock {wall_s:.2f} s (peak RSS {peak_s:.0f} MB); speedup {row['speedup']:.2f}x; "
            f"agreement {agreement['mean']:.4f} (canal {agreement['canal']:.4f}, "
            f"foreground {agreement['foreground']:.4f})")
        reference = (references or {}).get(scan.name)
        if reference is not None:  # which of the two disagreeing outputs is right
            row["against_reference"] = {name: reference_dice(label, reference, affine)
                                        for name, label in (("app", app.label), ("stock", stock))}
            log(f"{scan.name}: against its reference ({', '.join(NAMES[v] for v in sorted(reference.info.annotated))}"
                " annotated): " + "; ".join(
                    f"{name} Dice {r['mean_dice']:.3f}, levels {r['level_correct']}/{r['level_total']}"
                    + (f" (wrong: {', '.join(r['wrong_levels'])})" if r["wrong_levels"] else "")
                    for name, r in row["against_reference"].items()))
        results[scan.name] = row
    return results


#: the scoring computations compared with the reference (``EpistemicScorer.score`` arguments)
SCORING_VARIANTS: Dict[str, Dict[str, Any]] = {
    # the same computation with other dropout masks: how far the Monte-Carlo noise alone moves the ranking
    "full_other_masks": {"method": "full", "seed": 1},
    "fast": {"method": "fast"},
    # 2.5D: every 5th (4th, 2nd) sagittal slice exactly, samples batched
    "slices": {"method": "slices", "step": 5},
    "slices_step4": {"method": "slices", "step": 4},
    "slices_step2": {"method": "slices", "step": 2},
}


def benchmark_scoring(scans: Sequence[Path], model_path: str, conf: Dict[str, str], log=print) -> Dict[str, Any]:
    """Epistemic scores of ``scans`` by the reference (the ``full`` computation: ``mc_samples``
    separate passes, as MONAI Label computes them) and by each of :data:`SCORING_VARIANTS`:
    CPU seconds, and the Spearman correlation of each variant's ranking of the scans with
    the reference's."""
    from scipy.stats import spearmanr

    from lib.scoring.epistemic import EpistemicScorer

    plan = SpinePlan.from_conf(conf)
    scorer = EpistemicScorer(load_network(plan, model_path), plan, device="cpu")
    rows: Dict[str, Dict[str, float]] = {}
    for scan in scans:
        image = scorer.prepare(str(scan))
        row = rows[scan.name] = {}
        row["reference"], row["reference_cpu_s"] = cpu_timed(lambda: scorer.score(image, method="full"))
        for name, kwargs in SCORING_VARIANTS.items():
            row[name], row[f"{name}_cpu_s"] = cpu_timed(lambda k=kwargs: scorer.score(image, **k))
        log(f"{scan.name} {tuple(image.shape[1:])}: reference {row['reference']:.5f} ({row['reference_cpu_s']:.1f} CPU s), "
            + ", ".join(f"{n} {row[n]:.5f} ({row[n + '_cpu_s']:.1f} CPU s)" for n in SCORING_VARIANTS))
    names = list(rows)
    summary: Dict[str, Any] = {"scans": rows, "samples": plan.mc_samples}
    for variant in SCORING_VARIANTS:
        rho = float(spearmanr([rows[n]["reference"] for n in names], [rows[n][variant] for n in names]).correlation) \
            if len(names) > 2 else float("nan")
        cost = sum(rows[n]["reference_cpu_s"] for n in names) / max(sum(rows[n][f"{variant}_cpu_s"] for n in names), 1e-9)
        summary[variant] = {"cost_ratio": cost, "spearman": rho}
        log(f"scoring {variant}: {len(names)} scans, {plan.mc_samples} samples; {cost:.1f}x cheaper than "
            f"{plan.mc_samples} separate full passes; Spearman {rho:.3f}")
    return summary


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="weights (default: model/spine.pt, else a fresh network)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scans", nargs="*", type=Path, default=None,
                        help="scans besides the full-FOV one (default: sample-data/spider_*.nii.gz)")
    parser.add_argument("--fov-source", default=str(DEFAULT_FOV_SOURCE),
                        help="scan resampled into the full-FOV benchmark scan ('' to skip)")
    parser.add_argument("--score-scans", nargs="*", type=Path, default=None)
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--skip-infer", action="store_true")
    parser.add_argument("--shift-scans", nargs="*", type=Path, default=None,
                        help="scans for the window dependence (default: the full-FOV scan, unless --skip-infer, and the 6 validation scans)")
    parser.add_argument("--skip-shifts", action="store_true")
    parser.add_argument("--out", type=Path, default=WORK_DIR, help="folder for the generated scan and results.json")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    conf = dict(args.conf)
    plan = SpinePlan.from_conf(conf)

    model_path = args.model or weights_path(str(DEFAULT_MODEL_DIR))
    note = ""
    if not args.model and os.path.exists(model_path):
        try:
            check_plan(model_path, plan)
        except PlanMismatch as e:  # the shipped weights belong to the default plan, not to e.g. --conf preset tiny
            print(f"not using {model_path}: {e}")
            model_path = ""
    if not os.path.exists(model_path):
        model_path = os.path.join(tempfile.mkdtemp(), "random_init.pt")
        torch.save(build_network(plan).state_dict(), model_path)
        note = " (no trained weights: a freshly initialised network; agreement and ranking mean little)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu; plan {plan.preset}: "
          f"feature_size {plan.feature_size}, depths {plan.depths}, spacing {plan.target_spacing} mm, "
          f"roi {plan.roi_size}, overlap {plan.sw_overlap}, mc_samples {plan.mc_samples}")
    print(f"weights {model_path}{note}")

    results: Dict[str, Any] = {"model": model_path, "threads": args.threads, "conf": conf}
    fov = None
    if not args.skip_infer:
        scans: List[Path] = []
        fov_source = Path(args.fov_source) if args.fov_source else None
        if fov_source is not None and not fov_source.is_file():
            if args.fov_source != str(DEFAULT_FOV_SOURCE):
                parser.error(f"--fov-source {fov_source}: no such file")
            print(f"no full-FOV scan: {fov_source} is missing (the development data of ../shared)")
            fov_source = None
        references: Dict[str, Reference] = {}
        if fov_source is not None:
            fov = make_full_fov_scan(fov_source, args.out / f"full_fov_{fov_source.name.split('.')[0]}.nii.gz")
            scans.append(fov)
            reference = full_fov_reference(fov_source, fov)
            if reference is not None:
                references[fov.name] = reference
            print(f"full-FOV scan {fov} from {fov_source}: 512x512x15 at 0.6x0.6x4 mm"
                  + (f"; its reference labels {reference.label}" if reference else ""))
        scans += args.scans if args.scans is not None else sorted(SAMPLE_DATA.glob("spider_*.nii.gz"))
        args.out.mkdir(parents=True, exist_ok=True)
        results["infer"] = benchmark_infer(scans, model_path, conf, figures=args.out, references=references)
    if not args.skip_shifts:
        shift_scans = args.shift_scans if args.shift_scans is not None else ([fov] if fov else []) + default_shift_scans()
        if shift_scans:
            results["window_shifts"] = benchmark_window_shifts(shift_scans, model_path, conf)
    if not args.skip_scoring:
        score_scans = args.score_scans if args.score_scans is not None else default_score_scans()
        if len(score_scans) >= 3:
            results["scoring"] = benchmark_scoring(score_scans, model_path, conf)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    headline = results.get("infer", {}).get(fov.name if fov else "", None) or next(iter(results.get("infer", {}).values()), None)
    if headline:
        print(f"speedup {headline['speedup']:.2f} agreement {headline['agreement']:.4f}")


if __name__ == "__main__":
    main()
