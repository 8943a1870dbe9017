"""Seeding a studies folder from existing labels (lib/seed.py): real small scans, the real
command line, bad pairs skipped with their reason, split lists respected by training."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.train.basic_train import Context

from conftest import REPO, reliable_spider_ids, small_scan
from lib.lifecycle.autotrain import AutoTrainer, AutoTrainSettings
from lib.pipeline.plans import SpinePlan
from lib.trainers.spine import SpineTrainTask


def save_nifti(array, affine, path):
    nib.save(nib.Nifti1Image(array, affine), str(path))


def run_seed(site, studies, model_dir):
    return subprocess.run([sys.executable, "-m", "lib.seed", str(site), "--studies", str(studies),
                           "--model-dir", str(model_dir)], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Five good pairs (SPIDER scans made small) and five bad ones, with split lists."""
    root = tmp_path_factory.mktemp("seed")
    site = root / "site"
    (site / "images").mkdir(parents=True)
    (site / "labels").mkdir()
    (site / "splits").mkdir()
    cases = reliable_spider_ids()[:5]
    for case_id in cases:
        image, label = small_scan(case_id, root / "ref")
        (site / "images" / f"{case_id}.nii.gz").write_bytes(image.read_bytes())
        (site / "labels" / f"{case_id}_seg.nii.gz").write_bytes(label.read_bytes())
    image = nib.load(site / "images" / f"{cases[0]}.nii.gz")
    label = np.asanyarray(nib.load(site / "labels" / f"{cases[0]}_seg.nii.gz").dataobj)
    for bad in ("bad_grid", "bad_values", "bad_empty", "bad_nolabel"):
        (site / "images" / f"{bad}.nii.gz").write_bytes((site / "images" / f"{cases[0]}.nii.gz").read_bytes())
    save_nifti(label[:-1], image.affine, site / "labels" / "bad_grid_seg.nii.gz")  # one slice short
    wrong = label.copy()
    wrong[label == 3] = 42  # not a value of the label table
    save_nifti(wrong, image.affine, site / "labels" / "bad_values_seg.nii.gz")
    save_nifti(np.zeros_like(label), image.affine, site / "labels" / "bad_empty_seg.nii.gz")
    (site / "images" / "bad_truncated.nii.gz").write_bytes((site / "images" / f"{cases[1]}.nii.gz").read_bytes()[:4000])
    (site / "labels" / "bad_truncated_seg.nii.gz").write_bytes((site / "labels" / f"{cases[1]}_seg.nii.gz").read_bytes())
    (site / "labels" / "orphan_seg.nii.gz").write_bytes((site / "labels" / f"{cases[1]}_seg.nii.gz").read_bytes())
    (site / "splits" / "train.txt").write_text(f"{cases[0]}\n")
    (site / "splits" / "val.txt").write_text(f"# validation\n{cases[1]}\n{cases[2]}\nbad_empty\n")
    (site / "splits" / "test.txt").write_text(f"{cases[3]}\n\n")
    studies, model_dir = root / "studies", root / "model"
    result = run_seed(site, studies, model_dir)
    return {"site": site, "studies": studies, "model_dir": model_dir, "cases": cases, "result": result}


def test_good_pairs_are_imported_as_final_labels(site):
    result, studies, cases = site["result"], site["studies"], site["cases"]
    assert result.returncode == 1, result.stderr  # bad pairs were skipped
    assert "imported 5 image(s) with final labels" in result.stdout, result.stdout
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    assert sorted(datastore.get_labeled_images()) == sorted(cases)
    assert sorted(datastore.list_images()) == sorted(cases)  # no image of a skipped pair stays behind
    for case_id in cases:
        stored = nib.load(studies / "labels" / "final" / f"{case_id}.nii.gz")
        original = nib.load(site["site"] / "labels" / f"{case_id}_seg.nii.gz")
        assert np.array_equal(np.asanyarray(stored.dataobj), np.asanyarray(original.dataobj))


def test_bad_pairs_are_skipped_with_the_reason(site):
    out = site["result"].stdout
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if line.startswith("skipped ")}
    assert "does not match the image shape" in lines["skipped bad_grid"]
    assert "42" in lines["skipped bad_values"]
    assert "empty" in lines["skipped bad_empty"]
    assert "no label" in lines["skipped bad_nolabel"]
    assert "truncated" in lines["skipped bad_truncated"]
    assert "without an image" in lines["skipped orphan"]
    assert "bad_empty (validation list) has no final label" in out


def test_split_lists_go_into_the_persisted_split(site):
    cases = site["cases"]
    split = json.loads((site["model_dir"] / "split.json").read_text())
    assert split == {"train": [cases[0]], "validation": sorted(cases[1:3]), "test": [cases[3]]}
    assert "split now: 1 train, 2 validation, 1 test" in site["result"].stdout


def test_training_never_sees_test_images(site):
    cases = site["cases"]
    datastore = LocalDatastore(str(site["studies"]), extensions=["*.nii.gz"], auto_reload=False)
    task = SpineTrainTask(str(site["model_dir"]), SpinePlan.from_conf({"preset": "tiny"}))
    context = Context()
    context.datalist = task.pre_process({}, datastore)
    train, val = task.partition_datalist(context)
    train_ids, val_ids = {r["id"] for r in train}, {r["id"] for r in val}
    assert cases[3] not in train_ids | val_ids
    assert val_ids >= set(cases[1:3]) and cases[0] in train_ids
    assert train_ids | val_ids == set(cases) - {cases[3]}  # the unlisted image got a side
    # nor do the auto-train counters count them
    auto = AutoTrainer(str(site["model_dir"]), AutoTrainSettings(min_labels=1), datastore.get_labeled_images,
                       lambda: False, lambda: False)
    assert sorted(auto.labeled()) == sorted(set(cases) - {cases[3]})


def test_seeding_again_keeps_what_is_there_and_test_wins(site):
    cases = site["cases"]
    (site["site"] / "splits" / "train.txt").write_text("")
    (site["site"] / "splits" / "test.txt").write_text(f"{cases[3]}\n{cases[0]}\n")  # a train image becomes test
    result = run_seed(site["site"], site["studies"], site["model_dir"])
    assert "imported 0 image(s)" in result.stdout and "kept 5 image(s)" in result.stdout, result.stdout
    assert f"{cases[0]}: moved from train to test" in result.stdout
    split = json.loads((site["model_dir"] / "split.json").read_text())
    assert cases[0] in split["test"] and cases[0] not in split["train"]


def test_missing_site_folder_is_a_clear_error(tmp_path):
    result = run_seed(tmp_path / "nowhere", tmp_path / "studies", tmp_path / "model")
    assert result.returncode == 2 and "no images folder" in result.stderr
