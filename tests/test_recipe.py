"""The starter-model recipe (``python -m lib.train_recipe``) on the real development scans,
tiny preset: it trains on sagittal slabs, validates, resumes from its checkpoint, and its
published weights carry their plan."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, shared_data
from lib.lifecycle.model_store import file_sha256
from lib.pipeline.errors import PlanMismatch
from lib.pipeline.losses import COMPLETE, Annotation, marginal_cross_entropy
from lib.pipeline.networks import load_network
from lib.pipeline.plans import SpinePlan
from lib.train_recipe import SlabSampler, choose_cases, keep_log_until, learning_rate, preprocess

TINY = ["--conf", "preset", "tiny"]


def recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib.train_recipe", "--data", str(shared_data()), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=900)


def test_validation_cases_are_reliable_spider_scans_never_trained_on():
    train, val = choose_cases(shared_data(), 6)
    assert len(val) == 6 and not set(train) & set(val)
    assert all(i.startswith("spider_") for i in train + val)


def test_slab_samples_keep_anatomy(tmp_path):
    """Samples are (slab, Y, Z) windows with the label of the centre slice; a window centred on
    the spine holds most of the scan's labelled structures."""
    plan = SpinePlan.from_conf({"preset": "tiny", "train_patch": "64,96", "target_spacing": "2,3,3"})
    train, _ = choose_cases(shared_data(), 6)
    volumes = [preprocess(shared_data(), tmp_path, case_id, plan) for case_id in train[:2]]
    sampler = SlabSampler(volumes, plan, np.random.default_rng(0), jitter_mm=(0, 0))
    images, labels, annotations = sampler.batch(6)
    assert images.shape == (6, plan.slab_size, 64, 96) and labels.shape == (6, 1, 64, 96)
    assert labels.dtype == torch.int64
    assert set(np.unique(labels.numpy())) <= set(range(12)) | {255}  # 255 = ignore, kept for the loss
    present = [set(np.unique(label.numpy())) - {0, 255} for label in labels]
    assert max(len(p) for p in present) >= 8  # most levels in one view
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1) and learning_rate(100, 100, 1.0, 10) == 0.0


def test_offcentre_windows_overlap_the_spine_wherever_a_grid_could_put_them(tmp_path):
    """With ``offcentre_fraction`` 1 every window still overlaps the labelled spine by the
    minimum in both in-plane directions, but its position spreads far past the centred
    windows' jitter (spine at the window's edge, as on a sliding grid over a large view)."""
    plan = SpinePlan.from_conf({"preset": "tiny", "train_patch": "64,96", "target_spacing": "2,3,3"})
    train, _ = choose_cases(shared_data(), 6)
    volumes = [preprocess(shared_data(), tmp_path, case_id, plan) for case_id in train[:2]]
    roi = np.array([64, 96])
    offcentre = SlabSampler(volumes, plan, np.random.default_rng(1), offcentre_fraction=1.0, min_overlap_mm=30)
    centred = SlabSampler(volumes, plan, np.random.default_rng(1), jitter_mm=(0, 0))
    spine_lo, spine_hi = offcentre.spine_boxes[0]
    origins = np.array([offcentre.window_origin(0) for _ in range(300)])
    overlap = np.minimum(origins + roi, spine_hi + 1) - np.maximum(origins, spine_lo)
    assert (overlap >= np.minimum(10, (spine_hi - spine_lo + 1) // 2)).all()  # 30 mm at 3 mm
    padded = np.array(offcentre.volumes[0][0].shape[1:])
    assert (origins >= 0).all() and (origins + roi <= padded).all()
    centre = centred.window_origin(0)
    assert (np.abs(origins - centre).max(0) > roi // 3).all()  # far off-centre in both directions
    assert len({tuple(centred.window_origin(0)) for _ in range(5)}) == 1
    images, labels, _ = offcentre.batch(4)
    assert images.shape == (4, plan.slab_size, 64, 96) and labels.shape == (4, 1, 64, 96)
    with pytest.raises(ValueError, match="offcentre_fraction"):
        SlabSampler(volumes, plan, np.random.default_rng(0), offcentre_fraction=1.5)


def test_thick_slice_slabs_resample_only_the_sagittal_axis(tmp_path):
    """A thick-slice slab keeps what does not vary across the sagittal slices, reproduces what
    varies linearly (a box average and linear interpolation both do), and on a real scan
    blurs across the slices: neighbouring channels differ less than in the 1 mm scan's slab.
    The sampler with ``thick_slice_fraction`` 1 gives samples of the usual shapes."""
    from lib.pipeline.transforms import thick_slice_slab

    plan = SpinePlan.from_conf({"preset": "tiny", "train_patch": "64,96", "target_spacing": "1,3,3"})
    train, _ = choose_cases(shared_data(), 6)
    volume = preprocess(shared_data(), tmp_path, train[0], plan)
    image = volume["image"]
    x = image.shape[0] // 2
    window = (slice(10, 50), slice(20, 70))
    flat = np.repeat(image[x:x + 1], image.shape[0], axis=0)
    np.testing.assert_allclose(thick_slice_slab(flat, x, 1, window, 3.0, 1.3), np.repeat(flat[(slice(x, x + 1),) + window], 3, 0),
                               atol=1e-6)
    ramp = image[x][None] * (1 + 0.05 * np.arange(image.shape[0], dtype=np.float32))[:, None, None]
    expected = ramp[(slice(x - 1, x + 2),) + window]
    np.testing.assert_allclose(thick_slice_slab(ramp, x, 1, window, 4.0, 0.5), expected, rtol=1e-5, atol=1e-5)

    plain = image[(slice(x - 1, x + 2),) + window]
    thick = thick_slice_slab(image, x, 1, window, 4.0, 2.0)  # 4 mm slices of a 1 mm scan
    assert thick.shape == plain.shape and thick.dtype == np.float32
    assert np.abs(np.diff(thick, axis=0)).mean() < 0.7 * np.abs(np.diff(plain, axis=0)).mean()
    assert image.min() - 1e-6 <= thick.min() and thick.max() <= image.max() + 1e-6

    sampler = SlabSampler([volume], plan, np.random.default_rng(0), thick_slice_fraction=1.0)
    images, labels, _ = sampler.batch(3)
    assert images.shape == (3, plan.slab_size, 64, 96) and labels.shape == (3, 1, 64, 96)
    with pytest.raises(ValueError, match="thick_slice_fraction"):
        SlabSampler([volume], plan, np.random.default_rng(0), thick_slice_fraction=-0.1)
    with pytest.raises(ValueError, match="spacing_factor"):
        thick_slice_slab(image, x, 1, window, 0.5, 0.0)


def test_recipe_trains_resumes_and_publishes_with_its_plan(tmp_path):
    work, model_dir = tmp_path / "work", tmp_path / "model"
    common = ["--work", str(work), "--batch", "2", "--val-count", "2", "--checkpoint-every", "1", *TINY]
    first = recipe(*common, "--steps", "2", "--val-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and "val_mean_dice" in log[-1]
    second = recipe(*common, "--steps", "3", "--val-every", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 2" in second.stdout
    assert [json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    # a changed split is refused rather than mixed into the same run
    other = recipe("--work", str(work), "--val-count", "3", *TINY, "--steps", "4")
    assert other.returncode != 0 and "refusing to mix splits" in other.stderr
    published = recipe("--work", str(work), "--publish", str(model_dir))
    assert published.returncode == 0, published.stderr[-3000:]
    record = json.loads((model_dir / "spine.json").read_text())
    assert record["sha256"] == file_sha256(str(model_dir / "spine.pt"))
    assert record["plan"]["preset"] == "tiny" and record["validation_ids"] == json.loads(
        (work / "split.json").read_text())["validation"]
    load_network(SpinePlan.from_conf({"preset": "tiny"}), str(model_dir / "spine.pt"))
    with pytest.raises(PlanMismatch):
        load_network(SpinePlan.from_conf({}), str(model_dir / "spine.pt"))


def torchrun(*args: str, **popen) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2 -m lib.train_recipe`` (a free port; gloo on CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lib.train_recipe", "--data", str(shared_data()), "--threads", "1", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, **popen)


def test_two_processes_train_data_parallel(tmp_path):
    """Two gloo processes: one log and one set of weights (rank 0's), gradients averaged so
    that both processes end with the same parameters although they drew different slabs."""
    work = tmp_path / "work"
    run = torchrun("--work", str(work), "--batch", "2", "--val-count", "2", "--checkpoint-every", "1",
                   "--steps", "3", "--val-every", "3", *TINY)
    out, _ = run.communicate(timeout=900)
    assert run.returncode == 0, out[-3000:]
    assert "2 processes" in out
    digests = dict(re.findall(r"rank (\d) of 2: parameters (\w+)", out))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], out[-2000:]
    assert [json.loads(line)["step"] for line in (work / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (work / "best" / "spine.pt").exists() and out.count("stopped at step 3 of 3") == 1


def test_a_killed_worker_ends_the_run_and_it_resumes(tmp_path):
    """A worker killed mid-run ends the whole run (no process waits for ever); the last
    checkpoint is whole, and the same command on one process resumes from it."""
    import psutil

    work = tmp_path / "work"
    common = ["--work", str(work), "--batch", "2", "--val-count", "2", "--checkpoint-every", "1", "--val-every", "1000",
              *TINY]
    run = torchrun(*common, "--steps", "1000")
    log = work / "log.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and run.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    assert run.poll() is None, run.communicate()[0][-3000:]
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "lib.train_recipe" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out[-2000:]
    # torchrun stops rank 0 wherever it is, possibly between its log line and its checkpoint
    done = torch.load(work / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
    assert done >= 1  # the log held 2 lines, so checkpoint 1 was written
    resumed = recipe(*common, "--steps", str(done + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {done}" in resumed.stdout
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, done + 2))


def test_resume_trims_the_log_to_its_checkpoint(tmp_path):
    """A run stopped after its log line but before its checkpoint: the resume forgets that line."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 3)))
    keep_log_until(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    keep_log_until(log, 2)
    assert len(log.read_text().splitlines()) == 2
    keep_log_until(tmp_path / "absent.jsonl", 2)
    assert not (tmp_path / "absent.jsonl").exists()


def test_marginal_loss_judges_only_what_a_mask_annotates():
    torch.manual_seed(0)
    logits = torch.randn(1, 12, 4, 5)
    labels = torch.randint(0, 12, (1, 1, 4, 5))
    full = Annotation(frozenset(range(1, 12)))
    assert marginal_cross_entropy(logits, labels, [full]) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels[:, 0])), rel=1e-5)
    # bodies only: 0 may be a posterior element of an annotated vertebra: only drawn voxels count
    bodies = Annotation(frozenset(range(1, 6)), zero_is_known=False)
    body_labels = torch.where(labels <= 5, labels, torch.zeros_like(labels))
    drawn = body_labels[0, 0] > 0
    expected = -torch.log_softmax(logits, 1)[0].gather(0, body_labels[0])[0][drawn].mean()
    assert marginal_cross_entropy(logits, body_labels, [bodies]) == pytest.approx(float(expected), rel=1e-5)
    # discs only: 0 means "no disc", i.e. background, a vertebra or the canal
    discs = Annotation(frozenset(range(6, 11)))
    zeros = torch.zeros_like(labels)
    p = torch.softmax(logits, 1)[0]
    not_disc = p[[0, 1, 2, 3, 4, 5, 11]].sum(0)
    assert marginal_cross_entropy(logits, zeros, [discs]) == pytest.approx(float(-torch.log(not_disc).mean()), rel=1e-5)
    assert Annotation.from_manifest({"annotated_labels": [1, 2, 3, 4, 5], "vertebra_extent": "body_only"}) == bodies


def test_without_its_levels_a_sample_teaches_the_kind_of_each_structure():
    """``levels_known`` False: a drawn voxel costs -log p(its kind: any vertebra, any disc,
    the canal); calling L3 "L2" then costs nothing, calling it a disc does; with levels known
    it is the plain cross-entropy."""
    import dataclasses

    logits = torch.full((1, 12, 1, 3), -6.0)
    logits[0, 2, 0, 0] = logits[0, 7, 0, 1] = logits[0, 11, 0, 2] = 6.0  # L2, L2-L3 disc, canal
    labels = torch.tensor([[[[3, 3, 11]]]])  # drawn: L3, L3, canal
    kinds_only = dataclasses.replace(COMPLETE, levels_known=False)
    assert not kinds_only.complete
    p = torch.softmax(logits, 1)[0, :, 0]
    expected = -torch.log(torch.stack([p[1:6, 0].sum(), p[1:6, 1].sum(), p[11, 2]])).mean()
    assert marginal_cross_entropy(logits, labels, [kinds_only]) == pytest.approx(float(expected), rel=1e-5)
    assert float(-torch.log(p[1:6, 0].sum())) < 1e-3 < float(-torch.log(p[1:6, 1].sum()))  # the level free, the kind not
    assert marginal_cross_entropy(logits, labels, [COMPLETE]) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels[:, 0])), rel=1e-5)


def test_windows_without_the_l5s1_disc_teach_kinds_not_levels(tmp_path):
    """``levels_need_l5s1``: a window holding the scan's whole L5-S1 disc keeps the levels; one
    that cuts it or misses it teaches kinds only; without the option every window keeps them."""
    plan = SpinePlan.from_conf({"preset": "tiny", "train_patch": "64,96", "target_spacing": "2,3,3"})
    train, _ = choose_cases(shared_data(), 6)
    volumes = [preprocess(shared_data(), tmp_path, train[0], plan)]
    sampler = SlabSampler(volumes, plan, np.random.default_rng(0), offcentre_fraction=0.5, min_overlap_mm=30,
                          levels_need_l5s1=True)
    lo, hi = sampler.anchor_boxes[0]
    disc = np.argwhere(sampler.volumes[0][1] == 10)[:, 1:]
    assert (disc.min(0) == lo).all() and (disc.max(0) == hi).all()
    roi = np.array([64, 96])
    assert sampler.shows_anchor(0, lo) == bool(((hi - lo) < roi).all())
    assert not sampler.shows_anchor(0, hi)  # the window starts at the disc's far corner
    known = [a.levels_known for a in (sampler.sample()["annotation"] for _ in range(200))]
    assert 0 < sum(known) < len(known)
    assert sampler.annotations[0].levels_known  # the scan's own annotation is left as it was
    plain = SlabSampler(volumes, plan, np.random.default_rng(0), offcentre_fraction=0.5, min_overlap_mm=30)
    assert all(plain.sample()["annotation"].levels_known for _ in range(50))


def test_recipe_loss_ignores_255_and_is_diceCE_for_full_labels():
    """255 (T12 and above, unattributable pieces) counts for nothing: whatever the network says
    there leaves the loss unchanged; without 255 the loss is MONAI's DiceCE (batch Dice)."""
    from monai.losses import DiceCELoss

    from lib.train_recipe import RecipeLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 12, 8, 8)
    labels = torch.randint(0, 12, (2, 1, 8, 8))
    full = [Annotation(frozenset(range(1, 12)))] * 2
    reference = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, labels)
    assert RecipeLoss()(logits, labels, full) == pytest.approx(float(reference), rel=1e-4)
    ignored = labels.clone()
    ignored[:, :, :3] = 255
    other = logits.clone()
    other[:, :, :3] = torch.randn(2, 12, 3, 8) * 10  # other predictions where the label is 255
    assert RecipeLoss()(logits, ignored, full) == pytest.approx(float(RecipeLoss()(other, ignored, full)), rel=1e-5)
