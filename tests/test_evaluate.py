"""``lib.evaluate`` on hand-made predictions with known answers, built from real reference masks.

Unit cases use a real SPIDER mask (every 3rd in-plane voxel, real 255 ignore voxels kept)
and a real fastcleverseg VB3 body-only mask; the command line runs end to end on a small
real scan, once with ``--predictions`` and once with ``--model`` (random tiny network).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, reliable_spider_ids, shared_data, small_scan
from lib.evaluate import CaseInfo, EvaluationError, case_info_from_entry, evaluate_case, load_manifest, main
from lib.pipeline.io import write_label
from lib.pipeline.labels import CANAL, DISCS, IGNORE_VALUE, NAMES, VERTEBRAE
from lib.pipeline.networks import build_network
from lib.pipeline.plans import SpinePlan

L2, L3, L4 = VERTEBRAE[1], VERTEBRAE[2], VERTEBRAE[3]
STRUCTURES = VERTEBRAE + DISCS + (CANAL,)
OUTPUT_FILES = ["summary.json", "per_case.csv", "report.md", "dice_distribution.png", "overlay_best.png",
                "overlay_worst.png"]


def by_name(rows):
    return {r["structure"]: r for r in rows}


@pytest.fixture(scope="module")
def spider():
    """A real SPIDER reference mask (values 0..11 and 255), every 3rd in-plane voxel, with its affine."""
    case = reliable_spider_ids()[0]
    img = nib.load(shared_data() / "labels" / f"{case}.nii.gz").slicer[:, ::3, ::3]
    ref = np.asarray(img.dataobj).astype(np.uint8)
    assert set(np.unique(ref)) == set(STRUCTURES) | {0, IGNORE_VALUE}
    return ref, img.affine


def clean(ref):
    return np.where(ref == IGNORE_VALUE, 0, ref).astype(np.uint8)


def test_perfect_prediction(spider):
    ref, affine = spider
    rows, case = evaluate_case(ref, clean(ref), affine)
    assert len(rows) == 11
    for r in rows:
        assert r["status"] == "ok", r
        assert r["dice"] == pytest.approx(1.0) and r["sensitivity"] == 1.0
        assert r["hd95_mm"] == 0.0 and r["assd_mm"] == 0.0
    assert case["level_accuracy"] == 1.0 and (case["level_correct"], case["level_total"]) == (10, 10)
    assert case["missing"] == case["false_positive"] == case["duplicated"] == case["empty_predicted"] == []


def test_one_structure_missing(spider):
    ref, affine = spider
    pred = clean(ref)
    pred[pred == L4] = 0
    rows, case = evaluate_case(ref, pred, affine)
    r = by_name(rows)[NAMES[L4]]
    assert r["status"] == "missing" and r["dice"] == 0.0 and r["sensitivity"] == 0.0
    assert math.isnan(r["hd95_mm"]) and math.isnan(r["assd_mm"])
    assert case["missing"] == case["empty_predicted"] == [NAMES[L4]]
    assert all(x["dice"] == pytest.approx(1.0) for x in rows if x["value"] != L4)
    assert case["level_accuracy"] == pytest.approx(9 / 10)  # no vertebra predicted inside L4: wrong
    assert case["wrong_levels"] == [f"{NAMES[L4]} (none)"]


def test_swapped_levels(spider):
    ref, affine = spider
    pred = clean(ref)
    pred[ref == L2], pred[ref == L3] = L3, L2
    rows, case = evaluate_case(ref, pred, affine)
    named = by_name(rows)
    assert case["level_accuracy"] == pytest.approx(8 / 10)
    assert sorted(case["wrong_levels"]) == [f"{NAMES[L2]} (as {NAMES[L3]})", f"{NAMES[L3]} (as {NAMES[L2]})"]
    assert named[NAMES[L2]]["dice"] < 0.01 and named[NAMES[L3]]["dice"] < 0.01
    assert named[NAMES[L2]]["hd95_mm"] > 10  # a whole level away
    assert all(r["dice"] == pytest.approx(1.0) for r in rows if r["value"] not in (L2, L3))
    assert case["missing"] == [] and case["duplicated"] == []


def test_duplicated_level_is_flagged(spider):
    ref, affine = spider
    pred = clean(ref)
    pred[ref == L3] = L2  # "L2" predicted over both L2 and L3 (touching: one piece), L3 nowhere
    rows, case = evaluate_case(ref, pred, affine)
    assert case["duplicated"] == [NAMES[L2]]
    assert case["wrong_levels"] == [f"{NAMES[L3]} (as {NAMES[L2]})"]
    assert case["missing"] == [NAMES[L3]]
    assert case["level_accuracy"] == pytest.approx(9 / 10)


def test_disc_only_manifest_ignores_vertebra_predictions(spider):
    ref, affine = spider
    disc_ref = np.where(np.isin(ref, DISCS) | (ref == IGNORE_VALUE), ref, 0).astype(np.uint8)
    pred = clean(ref)  # a full prediction: vertebrae and canal too
    entry = load_manifest(shared_data() / "manifest.json")["fcs_IVD_11"]  # the real disc-only entry
    info = case_info_from_entry(entry)
    assert info.annotated == frozenset(DISCS) and not info.body_only
    rows, case = evaluate_case(disc_ref, pred, affine, info)
    for r in rows:
        if r["value"] in DISCS:
            assert r["status"] == "ok" and r["dice"] == pytest.approx(1.0) and r["hd95_mm"] == 0.0
        else:
            assert r["status"] == "not_annotated" and math.isnan(r["dice"]), r
    assert case["false_positive"] == [] and case["level_accuracy"] == 1.0 and case["level_total"] == 5
    # the same prediction without the manifest: every vertebra and the canal are false positives
    rows, case = evaluate_case(disc_ref, pred, affine, CaseInfo())
    assert case["false_positive"] == [NAMES[v] for v in VERTEBRAE + (CANAL,)]
    assert all(by_name(rows)[n]["dice"] == 0.0 for n in case["false_positive"])


def test_ignore_voxels_change_nothing(spider):
    ref, affine = spider
    ignore = ref == IGNORE_VALUE
    assert ignore.sum() > 1000  # real T12 / T12-L1 ignore labels
    baseline, base_case = evaluate_case(ref, clean(ref), affine)
    pred = clean(ref)
    pred[ignore] = np.random.default_rng(0).integers(0, 12, size=int(ignore.sum()))  # anything, e.g. T12 as "L1"
    rows, case = evaluate_case(ref, pred, affine)
    for a, b in zip(rows, baseline):
        for key in ("dice", "hd95_mm", "assd_mm", "sensitivity", "status", "pred_voxels", "level_correct"):
            assert a[key] == b[key], (key, a, b)
    assert case["level_accuracy"] == 1.0 and case["duplicated"] == [] and case["false_positive"] == []


def test_body_only_sensitivity():
    """VB3 bodies as reference; prediction = each body + posterior voxels of the same level."""
    case = "fcs_VB3_01"
    img = nib.load(shared_data() / "labels" / f"{case}.nii.gz")
    ref = np.asarray(img.dataobj).astype(np.uint8)
    info = case_info_from_entry(load_manifest(shared_data() / "manifest.json")[case])
    assert info.body_only and info.annotated == frozenset(VERTEBRAE)
    codes = nib.aff2axcodes(img.affine)
    ap = next(i for i, c in enumerate(codes) if c in "AP")
    step = 1 if codes[ap] == "P" else -1  # index direction that goes posterior
    pred = ref.copy()
    for shift in range(1, 26):  # 25 voxels (1 mm) of "posterior elements" behind each body
        moved = np.roll(ref, step * shift, axis=ap)
        pred = np.where((pred == 0) & (moved > 0), moved, pred)
    assert (pred > 0).sum() > 1.5 * (ref > 0).sum()
    rows, summary = evaluate_case(ref, pred, img.affine, info, case)
    for r in rows[:5]:
        assert r["body_only"] and r["status"] == "ok"
        assert r["sensitivity"] == 1.0 and r["level_correct"] is True
        assert math.isnan(r["dice"]) and math.isnan(r["hd95_mm"])
    assert all(r["status"] == "not_annotated" for r in rows[5:])
    assert summary["level_accuracy"] == 1.0 and summary["false_positive"] == []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small real scan laid out as images/, labels/ (LPS, 3 mm sagittal slices)."""
    root = tmp_path_factory.mktemp("small")
    case = reliable_spider_ids()[1]
    image, label = small_scan(case, root / "raw", axcodes="LPS")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    shutil.copy(image, root / "images" / f"{case}.nii.gz")
    shutil.copy(label, root / "labels" / f"{case}.nii.gz")
    ref_img = nib.load(label)
    return root, case, np.asarray(ref_img.dataobj).astype(np.uint8), ref_img.affine


@pytest.fixture(scope="module", autouse=True)
def cli_with_predictions(small, tmp_path_factory):
    """``python -m lib.evaluate --predictions`` on two cases, started in the background with the
    module's first test (a new interpreter spends most of its time importing torch/MONAI)."""
    root, case, ref, affine = small
    tmp_path = tmp_path_factory.mktemp("cli")
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(root / "images", images)
    labels.mkdir()
    shutil.copy(root / "labels" / f"{case}.nii.gz", labels / f"{case}.nii.gz")
    bad = f"{case}_swapped"  # the same scan under a second id, L2 and L3 swapped
    shutil.copy(root / "images" / f"{case}.nii.gz", images / f"{bad}.nii.gz")
    shutil.copy(root / "labels" / f"{case}.nii.gz", labels / f"{bad}.nii.gz")
    preds = tmp_path / "preds"
    preds.mkdir()
    write_label(ref, affine, preds / f"{case}_seg.nii.gz")  # the segment CLI's name
    swapped = ref.copy()
    swapped[ref == L2], swapped[ref == L3] = L3, L2
    write_label(swapped, affine, preds / f"{bad}.nii.gz")  # plain <id>.nii.gz is accepted too
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": [{"id": case, "annotated_labels": list(
        STRUCTURES), "vertebra_extent": "whole vertebra", "reliable": True}]}))  # found next to --labels
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lib.evaluate", "--images", str(images), "--labels", str(labels),
           "--predictions", str(preds), "--out", str(out)]
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    yield dict(proc=proc, log=log, cmd=cmd, tmp_path=tmp_path, images=images, labels=labels, preds=preds,
               out=out, case=case, bad=bad)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_command_line_with_predictions(cli_with_predictions, small, tmp_path, capsys):
    run = cli_with_predictions
    root, case, ref, affine = small
    bad, out, cmd = run["bad"], run["out"], run["cmd"]
    images, labels, preds = run["images"], run["labels"], run["preds"]
    rc = run["proc"].wait(timeout=300)
    run["log"].seek(0)
    assert rc == 0, run["log"].read()[-3000:]
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    for name in OUTPUT_FILES[3:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arguments"]["argv"] == cmd[3:]
    assert summary["arguments"]["manifest"] == str(run["tmp_path"] / "manifest.json")
    assert summary["counts"]["cases"] == 2 and summary["counts"]["cases_not_in_manifest"] == [bad]
    assert summary["overlays"] == {"overlay_best": case, "overlay_worst": bad}
    assert summary["level_identification"] == {"correct": 18, "total": 20, "accuracy": 0.9}
    assert summary["groups"]["discs"]["dice"]["mean"] == pytest.approx(1.0)
    assert summary["per_structure"]["L1"]["dice"]["mean"] == pytest.approx(1.0)
    assert summary["per_structure"]["L2"]["dice"]["n"] == 2
    assert summary["per_structure"]["L2"]["level_identification"]["accuracy"] == 0.5
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 22 and {r["case"] for r in rows} == {case, bad}
    l2 = next(r for r in rows if r["case"] == bad and r["structure"] == "L2")
    assert float(l2["dice"]) < 0.01 and l2["level_correct"] == "False" and l2["predicted_level"] == "L3"
    report = (out / "report.md").read_text()
    assert "| L5-S1 |" in report and "HD95" in report and "Level identification" in report

    # a prediction off the label's grid is a clear error
    write_label(ref[:, 1:], affine, preds / f"{case}_seg.nii.gz")
    rc = main(["--images", str(images), "--labels", str(labels), "--predictions", str(preds),
               "--out", str(tmp_path / "out2"), "--cases", case])
    assert rc == 2 and "prediction shape" in capsys.readouterr().err
    with pytest.raises(EvaluationError, match="shape"):
        evaluate_case(ref, ref[:, 1:], affine)


def test_command_line_with_model(small, tmp_path):
    root, case, ref, affine = small
    weights = tmp_path / "tiny.pt"
    torch.save(build_network(SpinePlan.from_conf({"preset": "tiny"})).state_dict(), weights)
    out = tmp_path / "out"
    rc = main(["--images", str(root / "images"), "--labels", str(root / "labels"), "--model", str(weights),
               "--out", str(out), "--conf", "preset", "tiny", "--device", "cpu"])
    assert rc == 0
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    pred = nib.load(out / "predictions" / f"{case}_seg.nii.gz")
    assert pred.shape == ref.shape and np.allclose(pred.affine, affine, atol=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arguments"]["conf"] == {"preset": "tiny"}
    assert summary["counts"]["cases"] == 1 and summary["cases"][0]["case"] == case
    assert summary["cases"][0]["level_total"] == 10  # every reference level scored, right or wrong
    with open(out / "per_case.csv") as f:
        assert len(list(csv.DictReader(f))) == 11


def test_far_apart_pieces_of_one_level_are_duplicated(spider):
    """"L1" also painted over L5: two pieces far apart (geometric check) and the majority in two levels."""
    ref, affine = spider
    pred = clean(ref)
    pred[ref == VERTEBRAE[4]] = VERTEBRAE[0]
    rows, case = evaluate_case(ref, pred, affine)
    assert case["duplicated"] == [NAMES[VERTEBRAE[0]]]
    from lib.evaluate import _boxes, _is_duplicated, voxel_spacing
    box = _boxes(pred)[VERTEBRAE[0]]
    assert _is_duplicated(pred[box] == VERTEBRAE[0], [s.start for s in box], affine,
                          float(np.prod(voxel_spacing(affine))) / 1000)


def test_cropped_metrics_equal_monai_on_the_whole_volume(spider):
    """Per-structure cropping is only for speed: same numbers as MONAI on the full grid, in mm."""
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
    from scipy import ndimage as ndi

    ref, affine = spider
    full = clean(ref)
    pred = np.where(ndi.minimum_filter(full, 3) == full, full, 0).astype(np.uint8)  # eroded by one voxel
    pred[np.roll(full, 6, axis=1) == CANAL] = CANAL  # canal shifted by 6 voxels
    pred[ref == IGNORE_VALUE] = 0  # what evaluate_case does before measuring
    rows, _ = evaluate_case(ref, pred, affine)
    spacing = [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    for v in (L3, DISCS[2], CANAL):
        p, r = torch.from_numpy(pred == v)[None, None], torch.from_numpy(full == v)[None, None]
        row = rows[v - 1]
        assert row["dice"] == pytest.approx(float(compute_dice(p, r, include_background=True)), abs=1e-6)
        assert row["hd95_mm"] == pytest.approx(float(compute_hausdorff_distance(
            p, r, include_background=True, percentile=95, spacing=spacing)), abs=1e-5)
        assert row["assd_mm"] == pytest.approx(float(compute_average_surface_distance(
            p, r, include_background=True, symmetric=True, spacing=spacing)), abs=1e-5)
        assert 0 < row["dice"] < 1 and row["hd95_mm"] > 0


def test_command_line_as_a_thick_slice_series(small, tmp_path, capsys):
    """``--slice-mm 4``: scan and reference resampled as a clinical series of 4 mm slices
    (covering the scan's width, 0.6 mm in-plane), the prediction made and scored on that grid,
    every reference structure still there."""
    root, case, ref, affine = small
    weights = tmp_path / "tiny.pt"
    torch.save(build_network(SpinePlan.from_conf({"preset": "tiny"})).state_dict(), weights)
    out = tmp_path / "out"
    argv = ["--images", str(root / "images"), "--labels", str(root / "labels"), "--model", str(weights),
            "--conf", "preset", "tiny", "--device", "cpu", "--slice-mm", "4"]
    assert main(argv + ["--out", str(out)]) == 0
    series = nib.load(out / "series_4mm" / "labels" / f"{case}.nii.gz")
    width_mm = ref.shape[0] * np.linalg.norm(affine[:3, 0])  # the small scans: sagittal slices on axis 0
    assert nib.aff2axcodes(affine)[0] in "LR"
    assert np.allclose(series.header.get_zooms(), (0.6, 0.6, 4.0), atol=1e-4)
    assert series.shape == (512, 512, max(3, int(np.ceil(width_mm / 4))))
    assert set(np.unique(np.asarray(series.dataobj))) - {0, 255} == set(np.unique(ref)) - {0, 255}
    image = nib.load(out / "series_4mm" / "images" / f"{case}.nii.gz")
    assert image.shape == series.shape and np.allclose(image.affine, series.affine)
    pred = nib.load(out / "predictions" / f"{case}_seg.nii.gz")
    assert pred.shape == series.shape and np.allclose(pred.affine, series.affine, atol=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"][0]["level_total"] == 10
    assert main(argv[:-1] + ["0", "--out", str(tmp_path / "bad")]) == 2
    assert "--slice-mm must be positive" in capsys.readouterr().err
