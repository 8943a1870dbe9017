"""Behaviour (never timing) of the speed-ups: body crop, fast MC-dropout scoring, the benchmark's pieces."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from lib.benchmark import make_full_fov_scan
from lib.pipeline.io import read_volume
from lib.pipeline.labels import NUM_CLASSES
from lib.pipeline.networks import FusedWindowAttention, build_network, enable_mc_dropout
from lib.pipeline.plans import SpinePlan
from lib.scoring.epistemic import (
    EpistemicScorer,
    RunningMutualInformation,
    epistemic_score,
    fitted_roi,
    sample_stack,
)
from lib.pipeline.transforms import body_mask, infer_pre_transforms
from lib.segment import SpineSegmenter

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
    for method in ("full", "fast", "slices"):
        first, again = scorer.score(image, method=method), scorer.score(image, method=method)
        assert first == again and first > 0
    with pytest.raises(ValueError, match="score_method"):
        scorer.score(image, method="slow")


def test_slice_scoring_computes_the_chosen_slices_as_the_full_computation(tmp_path):
    """Without dropout the passes are deterministic: the slices method's probabilities on
    every step-th slice equal the full sliding-window computation's on those slices."""
    from monai.inferers import SlidingWindowInferer

    scan = _scan_in_air(tmp_path / "scan.nii.gz")
    plan = SpinePlan.from_conf({**TINY, "dropout": "0", "roi_size": "-1,32,64"})
    torch.manual_seed(3)
    scorer = EpistemicScorer(build_network(plan), plan)
    x = torch.as_tensor(scorer.prepare(str(scan)), dtype=torch.float32)[None]
    with torch.no_grad():
        full = torch.softmax(SlidingWindowInferer(plan.roi_size, sw_batch_size=2, overlap=plan.sw_overlap,
                                                  mode="gaussian")(x, scorer.network)[0], 0)
        chosen = scorer.slice_probabilities(x, samples=2, step=2)
    nx = x.shape[2]
    assert chosen.shape == (2, 12, len(range(1, nx, 2)), *x.shape[3:])
    assert torch.allclose(chosen[0], full[:, 1::2], atol=1e-4) and torch.allclose(chosen[1], chosen[0], atol=1e-5)
    with pytest.raises(ValueError, match="2.5d"):
        SpinePlan.from_conf({"preset": "3d", "score_method": "slices"})
    assert SpinePlan.from_conf({}).score_computation == "slices"  # auto, by the network
    assert SpinePlan.from_conf({"network_mode": "3d", "roi_size": "32,64,64"}).score_computation == "full"


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


def test_full_fov_reference_scores_each_output_on_the_annotated_discs(tmp_path):
    """The benchmark's full-FOV source brings its reference: the discs of ``fcs_IVD_11``
    resampled onto the scan's grid, judged on the discs only (the scan's vertebrae and canal
    are not annotated), so a one-level shift of the output shows as wrong levels."""
    from conftest import shared_data

    from lib.benchmark import full_fov_reference, reference_dice
    from lib.pipeline.labels import DISCS

    source = shared_data() / "images" / "fcs_IVD_11.nii.gz"
    grid = {"shape": (160, 160, 9), "spacing": (1.2, 1.2, 4.0)}
    scan = make_full_fov_scan(source, tmp_path / "fov.nii.gz", **grid)
    reference = full_fov_reference(source, scan, **grid)
    ref, ref_affine = read_volume(reference.label)
    _, affine = read_volume(scan)
    assert np.allclose(ref_affine, affine) and nib.load(str(reference.label)).get_data_dtype() == np.uint8
    assert set(np.unique(ref)) == {0, *DISCS} and reference.info.annotated == frozenset(DISCS)
    right = reference_dice(ref, reference, affine)
    assert right["mean_dice"] == 1.0 and (right["level_correct"], right["level_total"]) == (5, 5)
    shifted = ref.copy()
    for disc in DISCS[1:]:  # each disc called the one above it: L1-L2 erased, no L5-S1 left
        shifted[ref == disc] = disc - 1
    shifted[ref == DISCS[0]] = 0
    wrong = reference_dice(shifted, reference, affine)
    assert wrong["mean_dice"] < 0.1 and wrong["level_correct"] == 0 and wrong["missing"] == ["L5-S1"]
    assert full_fov_reference(tmp_path / "images" / "none.nii.gz", scan) is None


def test_sample_stack_is_the_dropout_passes_as_one_batch():
    plan = SpinePlan.from_conf({**TINY, "dropout": "0.3"})
    network = build_network(plan).eval()
    windows = torch.randn(2, 1, 32, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stacked = sample_stack(network, 3)(windows)
        single = network(windows)
    assert stacked.shape == (2, 3 * NUM_CLASSES, 32, 32, 64)
    for s in range(3):  # dropout off: every sample of a window is the plain pass of that window
        assert torch.allclose(stacked[:, s * NUM_CLASSES:(s + 1) * NUM_CLASSES], single, atol=1e-4)
    with torch.no_grad():
        stacked = sample_stack(enable_mc_dropout(network), 3)(windows).reshape(2, 3, NUM_CLASSES, 32, 32, 64)
    assert not torch.allclose(stacked[:, 0], stacked[:, 1])  # dropout on: the samples differ


def test_fused_window_attention_gives_monais_result_with_the_same_weights():
    """Infer-time fused attention: same logits as MONAI's own attention, same state dict;
    gradients (training) still flow through MONAI's computation."""
    two_blocks = {**TINY, "depths": "2,2,2,2"}  # the second block of each stage shifts its windows: masks
    torch.manual_seed(0)
    stock = build_network(SpinePlan.from_conf({**two_blocks, "fused_attention": "false"})).eval()
    fused = build_network(SpinePlan.from_conf(two_blocks)).eval()
    assert any(isinstance(m, FusedWindowAttention) for m in fused.modules())
    assert not any(isinstance(m, FusedWindowAttention) for m in stock.modules())
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = stock(x), fused(x)
    assert torch.allclose(expected, got, atol=1e-4)
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # a random network has near-ties; rounding may flip those
    assert torch.equal(expected.argmax(1)[clear], got.argmax(1)[clear])
    fused.train()
    fused(x[:1]).sum().backward()  # the training path: MONAI's attention, gradients reach the bias table
    table = next(m for m in fused.modules() if isinstance(m, FusedWindowAttention)).relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_benchmark_runs_end_to_end_on_real_scans(tmp_path, capsys):
    """The benchmark's command on small real scans with the tiny network: every pipeline and
    scoring computation runs, results.json holds them, the last line is the headline.
    (The full-FOV scan is left out for time; ``test_full_fov_scan_geometry`` covers it.)"""
    from conftest import reliable_spider_ids, small_scan

    from lib.benchmark import SCORING_VARIANTS, WINDOW_SHIFTS_MM, main

    scans = [small_scan(case, tmp_path / "scans")[0] for case in reliable_spider_ids()[:3]]
    out = tmp_path / "bench"
    main(["--fov-source", "", "--scans", str(scans[1]), "--score-scans", *map(str, scans),
          "--shift-scans", str(scans[0]), "--out", str(out), "--conf", "preset", "tiny"])
    lines = capsys.readouterr().out.strip().splitlines()
    speedup, agreement = lines[-1].split()[1::2]
    assert lines[-1].startswith("speedup ") and float(speedup) > 0 and 0 <= float(agreement) <= 1
    results = json.loads((out / "results.json").read_text())
    assert list(results["infer"]) == [scans[1].name]
    for row in results["infer"].values():
        assert row["app_s"] > 0 and row["stock_s"] > 0 and row["app_peak_mb"] > 0
        assert set(row["steps"]) >= {"app without fused attention", "app with one window per pass"}
        assert Path(row["figure"]).stat().st_size > 10_000  # the two outputs drawn, app contours over stock
    shifts = results["window_shifts"]
    assert list(shifts["scans"]) == [scans[0].name] and set(shifts["scans"][scans[0].name]) == set(WINDOW_SHIFTS_MM)
    assert 0 <= shifts["min"] <= shifts["median"] <= 1
    scoring = results["scoring"]
    assert len(scoring["scans"]) == 3
    for variant in SCORING_VARIANTS:
        assert -1 <= scoring[variant]["spearman"] <= 1 and scoring[variant]["cost_ratio"] > 0
        assert all(row[variant] > 0 for row in scoring["scans"].values())


@pytest.mark.parametrize("roi, offset, before", [
    ((-1, 32, 64), (0, 0, 0), (0, 1, 12)),   # smaller than the window: centred, as MONAI pads it
    ((-1, 32, 64), (0, 10, 3), (0, 11, 15)),  # moved further in: the window falls posterior/inferior of it
    ((4, 16, 16), (0, 5, 0), (0, 5, 0)),      # larger than the window: the offset alone
])
def test_place_in_window_puts_the_scan_at_its_offset_inside_a_zero_canvas(roi, offset, before):
    from lib.benchmark import place_in_window

    volume = torch.rand(1, 1, 5, 30, 40) + 1
    canvas, inside = place_in_window(volume, roi, offset)
    assert [s.start for s in inside] == list(before) and [s.stop - s.start for s in inside] == [5, 30, 40]
    assert all(c >= r for c, r in zip(canvas.shape[2:], roi))
    assert torch.equal(canvas[(Ellipsis,) + inside], volume)
    assert canvas.sum() == pytest.approx(volume.sum().item(), rel=1e-6)  # zeros everywhere else


class _IntensityBins(torch.nn.Module):
    """A 'network' whose logits at a voxel depend on that voxel's intensity only, plus, with
    ``ramp``, on where the voxel lies in its window (what a window-dependent network does)."""

    def __init__(self, ramp: float = 0.0):
        super().__init__()
        self.ramp = ramp

    def forward(self, x):  # (B, 1, X, Y, Z) -> (B, NUM_CLASSES, X, Y, Z)
        centres = torch.linspace(0, 1, NUM_CLASSES).view(1, -1, 1, 1, 1)
        logits = -((x - centres) ** 2) * 50
        position = torch.linspace(0, 1, x.shape[3]).view(1, 1, 1, -1, 1)
        return logits + self.ramp * position * torch.arange(NUM_CLASSES).view(1, -1, 1, 1, 1)


def test_window_shift_agreement_moves_the_window_and_compares_like_with_like(tmp_path):
    """A network that does not care where its window falls agrees exactly under every shift;
    one whose answer depends on the position in the window does not."""
    from conftest import reliable_spider_ids, small_scan

    from lib.benchmark import window_shift_agreement

    scan = small_scan(reliable_spider_ids()[0], tmp_path)[0]
    plan = SpinePlan.from_conf(TINY)
    shifts = {"none": (0.0, 0.0), "posterior 40 mm": (40.0, 0.0), "inferior 40 mm": (0.0, 40.0)}
    invariant = window_shift_agreement(scan, _IntensityBins(), plan, shifts)
    assert all(a == {"mean": 1.0, "canal": 1.0, "foreground": 1.0} for a in invariant.values()), invariant
    dependent = window_shift_agreement(scan, _IntensityBins(ramp=2.0), plan, shifts)
    assert dependent["none"]["mean"] == 1.0
    assert dependent["posterior 40 mm"]["mean"] < 0.95, dependent
