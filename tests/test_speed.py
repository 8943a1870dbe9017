"""Behaviour (never timing) of the speed-ups: body crop, fast MC-dropout scoring, the benchmark's pieces."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from lib.benchmark import agreement_report, label_agreement, make_full_fov_scan
from lib.io import read_volume
from lib.networks import build_network
from lib.plans import SpinePlan
from lib.scoring.epistemic import (
    EpistemicScorer,
    RunningMutualInformation,
    epistemic_score,
    fitted_roi,
)
from lib.segment import SpineSegmenter
from lib.transforms import body_mask, infer_pre_transforms

TINY = {"preset": "tiny"}


def _scan_in_air(path, shape=(40, 48, 48), body=(slice(12, 30), slice(10, 40), slice(8, 34)), seed=0):
    """A NIfTI whose signal fills only ``body``; the rest is noisy air."""
    rng = np.random.default_rng(seed)
    data = rng.normal(3.0, 1.0, shape).clip(0)  # magnitude-image noise in the air
    data[body] = 300 + 50 * rng.standard_normal(data[body].shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def test_body_mask_ignores_isolated_noise():
    image = torch.zeros(1, 20, 20, 20)
    image[0, 5:15, 5:15, 5:15] = 0.8
    image[0, 1, 18, 2] = 1.0  # one bright voxel in the air
    mask = body_mask(image, threshold=0.05)
    assert mask[0, 10, 10, 10] and not mask[0, 1, 18, 2]
    idx = torch.nonzero(mask[0])
    assert idx.min().item() >= 3 and idx.max().item() <= 16


def test_body_crop_keeps_the_body_and_inverts_to_the_scan_grid(tmp_path):
    scan = _scan_in_air(tmp_path / "scan.nii.gz")
    plan = SpinePlan.from_conf({**TINY, "target_spacing": "2,2,2"})
    cropped = Compose(infer_pre_transforms(plan))({"image": str(scan)})["image"]
    full = Compose(infer_pre_transforms(SpinePlan.from_conf({**TINY, "target_spacing": "2,2,2",
                                                             "crop_to_body": "false"})))({"image": str(scan)})["image"]
    assert full.shape[1:] == (40, 48, 48)
    assert all(c < f for c, f in zip(cropped.shape[1:], full.shape[1:]))  # air removed on every axis
    assert all(c >= b + 2 * plan.body_margin - 2 for c, b in zip(cropped.shape[1:], (18, 30, 26)))
    # the served label still has the scan's exact grid
    model = tmp_path / "w.pt"
    torch.save(build_network(SpinePlan.from_conf(TINY)).state_dict(), model)
    result = SpineSegmenter(str(model), TINY, device="cpu").segment(scan)
    data, affine = read_volume(scan)
    assert result.label.shape == data.shape and np.allclose(result.affine, affine)


@pytest.mark.parametrize("decision", ["argmax", "kind_first"])
def test_running_mutual_information_equals_the_stacked_computation(decision):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(4, 12, 6, 5, 7, generator=g) * 3, 1)
    running = RunningMutualInformation(decision)
    for p in probs:
        running.add(p)
    assert running.score() == pytest.approx(epistemic_score(probs, decision), rel=1e-5)
    same = torch.softmax(torch.randn(1, 12, 6, 5, 7, generator=g), 1).expand(3, -1, -1, -1, -1)
    assert epistemic_score(same) == pytest.approx(0.0, abs=1e-6)  # samples that agree: no epistemic part


def test_fitted_roi():
    assert fitted_roi((11, 39, 90), (32, 96, 96)) == (32, 64, 96)
    assert fitted_roi((40, 200, 33), (32, 96, 96)) == (32, 96, 64)
    assert fitted_roi((5, 6, 7), (32, 64, 64)) == (32, 32, 64)  # never 32^3: the bottleneck needs 2+ voxels


def test_fast_and_full_scores_are_reproducible_and_positive(tmp_path):
    scan = _scan_in_air(tmp_path / "scan.nii.gz")
    plan = SpinePlan.from_conf({**TINY, "dropout": "0.3", "mc_samples": "3"})
    scorer = EpistemicScorer(build_network(plan), plan)
    image = scorer.prepare(str(scan))
    for method in ("full", "fast"):
        first, again = scorer.score(image, method=method), scorer.score(image, method=method)
        assert first == again and first > 0
    with pytest.raises(ValueError, match="score_method"):
        scorer.score(image, method="slow")


def test_full_fov_scan_geometry(tmp_path):
    source = _scan_in_air(tmp_path / "src.nii.gz")
    out = make_full_fov_scan(source, tmp_path / "fov.nii.gz", shape=(64, 64, 5), spacing=(1.0, 1.0, 4.0))
    data, affine = read_volume(out)
    assert data.shape == (64, 64, 5)
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), (1.0, 1.0, 4.0))
    assert nib.aff2axcodes(affine) == ("P", "I", "L")
    src, src_affine = read_volume(source)
    centre = affine[:3, :3] @ ((np.array(data.shape) - 1) / 2) + affine[:3, 3]
    src_centre = src_affine[:3, :3] @ ((np.array(src.shape) - 1) / 2) + src_affine[:3, 3]
    assert np.allclose(centre, src_centre)
    assert data.max() > 250  # the body is inside the field of view


def test_label_agreement():
    a = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1
    b = a.copy()
    assert label_agreement(a, b) == 1.0
    b[:, :, :2] = 0  # half of structure 1 lost
    assert label_agreement(a, b) == pytest.approx(2 * 16 / (32 + 16))
    b[3, 3, 3] = 11  # a structure only in one
    assert label_agreement(a, b) == pytest.approx((2 * 16 / 48 + 0) / 2)
    report = agreement_report(a, b)
    assert report["mean"] == label_agreement(a, b)
    assert report["canal"] == 0.0 and report["foreground"] == pytest.approx(2 * 16 / (32 + 17))
