"""Unit tests of the plan, the label table, label remapping, the split and the DICOM writer."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import reliable_spider_ids, small_scan
from lib.lifecycle.splits import update_split
from lib.pipeline.errors import InvalidInput
from lib.pipeline.io import conform_label, read_volume, remap_to_label_table
from lib.pipeline.labels import CANAL, DISCS, LABELS, NAMES, VERTEBRAE, disc_between, value_of
from lib.pipeline.plans import SpinePlan


def test_label_table_is_contiguous_and_complete():
    assert list(LABELS.values()) == list(range(12))
    assert VERTEBRAE == (1, 2, 3, 4, 5) and DISCS == (6, 7, 8, 9, 10) and CANAL == 11
    assert [NAMES[disc_between(v)] for v in VERTEBRAE] == ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    assert value_of(" l4_l5 ") == 9 and value_of("Spinal Canal") == 11
    with pytest.raises(KeyError, match="unknown structure"):
        value_of("T12")


def test_plan_presets_and_overrides():
    default, tiny = SpinePlan.from_conf({}), SpinePlan.from_conf({"preset": "tiny"})
    assert sum(tiny.depths) < sum(default.depths) and tiny.max_epochs == 1 < default.max_epochs
    assert min(tiny.target_spacing) > max(default.target_spacing)
    plan = SpinePlan.from_conf({"roi_size": "64,64,32", "target_spacing": "1.5,1,1", "sw_overlap": "0.5",
                                "model_dir": "/x"})
    assert plan.roi_size == (64, 64, 32) and plan.target_spacing == (1.5, 1.0, 1.0) and plan.sw_overlap == 0.5
    assert plan.extra == {"model_dir": "/x"}
    with pytest.raises(ValueError, match="multiple of 32"):
        SpinePlan.from_conf({"preset": "3d", "roi_size": "30,64,64"})
    with pytest.raises(ValueError, match="unknown preset"):
        SpinePlan.from_conf({"preset": "huge"})


def test_remap_slicer_order_by_name():
    ours = np.random.default_rng(0).integers(0, 12, size=(6, 7, 8))
    order = [11, 5, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    slicer = np.zeros_like(ours)
    for i, v in enumerate(order, start=1):
        slicer[ours == v] = i
    names = [NAMES[v] for v in order]
    assert np.array_equal(remap_to_label_table(slicer, names), ours)
    assert np.array_equal(remap_to_label_table(ours, None), ours)
    with pytest.raises(InvalidInput, match="outside"):
        remap_to_label_table(ours + 20, None)
    with pytest.raises(InvalidInput, match="no segment name"):
        remap_to_label_table(slicer, names[:5])
    with pytest.raises(InvalidInput, match="unknown segment names"):
        remap_to_label_table(slicer, ["T12"] + names[1:])


def test_ignore_value_becomes_background():
    label = np.array([[[0, 1, 255]]], dtype=np.uint8)
    assert remap_to_label_table(label, None).tolist() == [[[0, 1, 0]]]


def test_conform_label_refuses_other_grid(tmp_path):
    image, label = small_scan(reliable_spider_ids()[0], tmp_path, axcodes="PIR")
    out = tmp_path / "conformed.nii.gz"
    summary = conform_label(str(label), str(image), None, str(out))
    assert "L3" in summary["structures"] and "spinal canal" in summary["structures"]
    lab = nib.load(label)
    moved = nib.Nifti1Image(np.asanyarray(lab.dataobj), lab.affine @ np.diag([1, 1, 1.5, 1]))
    nib.save(moved, tmp_path / "moved.nii.gz")
    with pytest.raises(InvalidInput, match="geometry"):
        conform_label(str(tmp_path / "moved.nii.gz"), str(image), None, str(tmp_path / "never.nii.gz"))
    assert not (tmp_path / "never.nii.gz").exists()


def test_split_is_persistent_and_grows(tmp_path):
    path = str(tmp_path / "split.json")
    ids = [f"case{i:02d}" for i in range(10)]
    train, val = update_split(path, ids[:5], 0.2)
    assert len(val) == 1 and sorted(train + val) == ids[:5]
    train2, val2 = update_split(path, ids, 0.2)
    assert set(val) <= set(val2) and len(val2) == 2 and not set(train2) & set(val2)
    assert update_split(path, list(reversed(ids)), 0.2) == (train2, val2)  # arrival order does not matter
    assert json.loads(open(path).read())["validation"] == val2
    # an image whose label was removed leaves the lists it is returned in, not the file
    train3, val3 = update_split(path, [i for i in ids if i != val2[0]], 0.2)
    assert val2[0] not in val3


def test_dicom_series_round_trip(tmp_path):
    from lib.pipeline.dicom import write_dicom_series

    image, _ = small_scan(reliable_spider_ids()[0], tmp_path, axcodes="LPS")
    array, affine = read_volume(image)
    write_dicom_series(array, affine, str(tmp_path / "series"))
    series, series_affine = read_volume(tmp_path / "series")
    assert sorted(series.shape) == sorted(array.shape)
    # the same world point holds the same intensity (ITK may order slices the other way)
    for ijk in ([1, 5, 7], [0, 20, 30], [array.shape[0] - 1, 3, 4]):
        world = affine @ np.array([*ijk, 1.0])
        other = np.round(np.linalg.solve(series_affine, world)[:3]).astype(int)
        assert abs(float(series[tuple(other)]) - float(array[tuple(ijk)])) <= 1e-3 * float(np.ptp(array)) + 1e-6


def test_the_starter_keeps_serving_until_compared_on_enough_site_images():
    """Promotion gate: a candidate replaces the shipped starter only when compared on
    STARTER_MIN_VAL_IMAGES of the site's validation images; a site's own model as before."""
    from lib.lifecycle.model_store import DEFAULT_MODEL_DIR, file_sha256, weights_path
    from lib.lifecycle.versions import STARTER_MIN_VAL_IMAGES, compare, starter_sha256

    shipped = starter_sha256()
    assert shipped == file_sha256(weights_path(str(DEFAULT_MODEL_DIR)))  # the record names the shipped weights

    def measured(dice, n, sha=None):
        return {"val_mean_dice": dice, "validation_ids": [f"img{i}" for i in range(n)],
                **({"sha256": sha} if sha else {})}

    for n in range(STARTER_MIN_VAL_IMAGES):
        promote, reason = compare(measured(0.95, n), measured(0.5, n, shipped), shipped)
        assert not promote and "starter model keeps serving" in reason, reason
    n = STARTER_MIN_VAL_IMAGES
    assert compare(measured(0.95, n), measured(0.5, n, shipped), shipped)[0]
    assert not compare(measured(0.4, n), measured(0.5, n, shipped), shipped)[0]
    # a model the site trained itself: no validation image yet -> the newest serves; else the better one
    assert compare(measured(None, 0), measured(None, 0, "f" * 64), shipped)[0]
    assert compare(measured(0.6, 1), measured(0.5, 1, "f" * 64), shipped)[0]
    assert compare({}, {}, shipped)[0]  # nothing served before
