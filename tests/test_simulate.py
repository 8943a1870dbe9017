"""The annotation simulation (lib/simulate.py) end to end against the real server, made small:
one strategy, one seed, 4 pool scans, 1 test scan, a training at 2 and at 4 labels."""

from __future__ import annotations

import csv
import json
import math

from conftest import shared_data
from lib import simulate


def test_minimal_simulation(tmp_path):
    data = shared_data()
    out = tmp_path / "sim"
    rc = simulate.main(["--data", str(data), "--pool-size", "4", "--test-size", "1", "--strategies", "epistemic",
                        "--seeds", "0", "--out", str(out), "--max-labels", "4", "--timeout", "900",
                        "--conf", "auto_train_min_labels", "2", "--conf", "auto_train_new_labels", "2",
                        "--conf", "max_epochs", "1"])
    assert rc == 0
    with open(out / "simulation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["n_labels"]) for r in rows] == [2, 4], rows  # one evaluation after each training
    for r in rows:
        assert r["strategy"] == "epistemic" and r["seed"] == "0" and r["test_cases"] == "1"
        for key in ("dice_vertebrae", "dice_discs", "dice_canal", "dice_overall"):
            assert math.isfinite(float(r[key])) and 0 <= float(r[key]) <= 1, (key, r)
    # the first training makes a model serve where none did; the second leaves a new candidate
    assert rows[0]["model_version"] and rows[0]["version_changed"] == "True"
    assert rows[1]["candidate_version"] != rows[0]["candidate_version"]
    if rows[1]["promoted"] == "True":
        assert rows[1]["model_version"] == rows[1]["candidate_version"] != rows[0]["model_version"]
    assert rows[-1]["all_labels"] == "True"  # the whole pool was labelled
    assert math.isfinite(float(rows[-1]["candidate_dice_overall"]))  # the model trained on every label
    assert (out / "learning_curve.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_labels_points"] == 1 and "epistemic" in summary["strategies"]
    # the held-out scan never reached the server; every pool image got its final label
    config = json.loads((out / "config.json").read_text())
    studies = out / "runs" / "epistemic-seed0" / "studies"
    assert sorted(p.name[:-7] for p in studies.glob("*.nii.gz")) == sorted(config["pool_cases"])
    assert not set(config["test_cases"]) & {p.name[:-7] for p in studies.rglob("*.nii.gz")}
    picks = json.loads((out / "runs" / "epistemic-seed0" / "run.json").read_text())["picks"]
    assert len({p["image"] for p in picks}) == 4
    assert [p["how"] for p in picks][:2] == ["seeded client-side"] * 2  # no model yet: seeded pick


def test_real_size_data_is_the_starter_recipes_split(tmp_path):
    """--real-size: the test set is the recipe's validation split (the model card's), the pool its
    training scans, both at full resolution; pool labels hold only values the server accepts."""
    import nibabel as nib
    import numpy as np

    from lib.train_recipe import VAL_COUNT, choose_cases

    def values(path):
        return set(np.unique(np.asarray(nib.load(path).dataobj)).tolist())

    data = shared_data()
    pool, test = simulate.prepare_data(tmp_path, 2, 3, data, real_size=True)
    train_ids, val_ids = choose_cases(data, VAL_COUNT)
    assert simulate.list_cases(test) == val_ids  # --test-size does not apply
    assert simulate.list_cases(pool) == train_ids[:2]
    case = train_ids[0]
    source = nib.load(data / "images" / f"{case}.nii.gz")
    made = nib.load(pool / "images" / f"{case}.nii.gz")
    assert sorted(made.shape) == sorted(source.shape)  # every voxel kept (reoriented only)
    assert np.allclose(sorted(made.header.get_zooms()), sorted(source.header.get_zooms()))
    assert values(pool / "labels" / f"{case}.nii.gz") <= set(range(12))
    # test labels keep 255 (not annotated) for the evaluation, exactly as the source has it
    assert values(test / "labels" / f"{val_ids[0]}.nii.gz") == values(data / "labels" / f"{val_ids[0]}.nii.gz")


def test_a_site_run_corrects_the_servers_presegmentation(tmp_path):
    """--site: a site's unseen, partially annotated scans (fcs_VB3: vertebral bodies only). The
    annotator saves the serving starter's pre-segmentation corrected where the reference draws,
    not the bodies-only reference; the curve is the body sensitivity at the right level."""
    import nibabel as nib
    import numpy as np

    from lib.pipeline.labels import DISCS, VERTEBRAE

    data = shared_data()
    out = tmp_path / "site"
    rc = simulate.main(["--data", str(data), "--site", "fcs_VB3", "--test-size", "1", "--pool-size", "2",
                        "--strategies", "epistemic", "--seeds", "0", "--out", str(out), "--max-labels", "2",
                        "--timeout", "900", "--conf", "max_epochs", "1"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["metric"] == "body_sensitivity"
    assert all(c.startswith("fcs_VB3") for c in config["pool_cases"] + config["test_cases"])
    assert not set(config["pool_cases"]) & set(config["test_cases"]) and len(config["pool_cases"]) == 2
    with open(out / "simulation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["n_labels"]) for r in rows] == [0, 2], rows  # the starter serves before any label
    for r in rows:
        assert 0 <= float(r["body_sensitivity"]) <= 1 and math.isnan(float(r["dice_overall"])), r  # no Dice here
        assert int(r["levels_scored"]) == 5 and float(r["vertebra_ml"]) > 0, r
    assert 0 <= float(rows[-1]["candidate_body_sensitivity"]) <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "body_sensitivity"
    # the all-labels figure is the model trained on every label, served or not
    assert summary["all_labels"] == float(rows[-1]["candidate_body_sensitivity"])
    assert summary["all_labels_serving"] == float(rows[-1]["body_sensitivity"])

    run = out / "runs" / "epistemic-seed0"
    for case in config["pool_cases"]:
        saved = np.asarray(nib.load(run / "labels" / f"{case}.nii.gz").dataobj)
        stored = np.asarray(nib.load(run / "studies" / "labels" / "final" / f"{case}.nii.gz").dataobj)
        reference = np.asarray(nib.load(data / "labels" / f"{case}.nii.gz").dataobj)
        assert np.array_equal(saved, stored)  # what the server keeps is the corrected label
        drawn = np.isin(reference, VERTEBRAE)
        assert np.array_equal(saved[drawn], reference[drawn])  # the drawn bodies, at their levels
        assert set(np.unique(saved).tolist()) <= set(range(12))
        # beyond what the reference draws: the model's discs and the rest of each vertebra, kept
        assert np.isin(saved, DISCS).any() and np.count_nonzero(np.isin(saved, VERTEBRAE)) > np.count_nonzero(drawn)
