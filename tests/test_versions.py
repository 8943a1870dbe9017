"""Model versions against a real server over HTTP (lib/lifecycle/versions.py, lib/server/admin.py, the train
task's ServingGuard): every run leaves a version; a worse one (trained on corrupted labels)
does not serve; the serving model is measured again when the validation images change;
rollback over HTTP and from the command line; scores follow the model; a restart keeps it all.

The auto-trainer's own behaviour (the second label starts a run, a third one during the run
and Slicer's train request start nothing) is in test_autotrain.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import REPO, Server, reliable_spider_ids, small_scan
from lib.lifecycle.model_store import file_sha256, model_version
from lib.pipeline.io import write_label
from lib.pipeline.labels import NAMES
from lib.scoring.epistemic import SCORE_KEY
from test_server import put_label

#: no warm-up (a learning rate of 0 in the first epoch would make that epoch's checkpoint the
#: serving weights again); a learning rate at which 8 steps on all-background labels visibly
#: shrink what the tiny network predicts; validation every 4 epochs, so that a run's "best"
#: checkpoint is never one taken before its training has had an effect (a candidate measured
#: after 4 steps is still a near copy of its start and wins or loses by chance)
CONF = {"auto_train": "false", "warmup_epochs": 0, "learning_rate": 0.01, "val_interval": 4}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    studies, model_dir, reference = root / "studies", root / "model", root / "reference"
    studies.mkdir()
    cases = reliable_spider_ids()[:5]  # 0-2 labelled over HTTP, 3 seeded later, 4 stays unlabelled
    for case_id in cases:
        image, _ = small_scan(case_id, reference)
        if case_id != cases[3]:
            (studies / image.name).write_bytes(image.read_bytes())
    site = {"studies": studies, "model_dir": model_dir, "reference": reference, "cases": cases, "root": root}
    site["server"] = Server(studies, model_dir, workdir=root, conf=CONF)
    yield site
    site["server"].stop()


def info(site):
    return requests.get(f"{site['server'].url}/info/", timeout=30).json()


def train(site, **params):
    status = site["server"].run_task("train", "spine", params)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])[-30:])


def infer_version(site, image_id):
    r = requests.post(f"{site['server'].url}/infer/spine", params={"image": image_id, "output": "json"}, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def stored_versions(site):
    return {m["version"]: m for m in (json.loads(p.read_text())
                                      for p in (site["model_dir"] / "versions").glob("*/metrics.json"))}


def serving(site):
    return json.loads((site["model_dir"] / "spine.json").read_text())


def test_first_training_serves_a_version_with_per_structure_dice(site):
    url, cases = site["server"].url, site["cases"]
    for case_id in cases[:3]:
        r = put_label(url, case_id, site["reference"] / f"{case_id}_label.nii.gz")
        assert r.status_code == 200, r.text
    train(site, max_epochs=8)
    split = json.loads((site["model_dir"] / "split.json").read_text())
    assert len(split["validation"]) == 1 and len(split["train"]) == 2

    (version, metrics), = stored_versions(site).items()
    assert metrics["promoted"] is True and metrics["decision"].startswith("first model")
    assert metrics["validation_ids"] == split["validation"]
    assert metrics["train_images"] == 2 and metrics["val_images"] == 1 and metrics["run_id"] and metrics["created"]
    assert set(metrics["per_structure_dice"]) == set(NAMES.values()) - {"background"}
    assert 0 < metrics["val_mean_dice"] <= 1
    assert file_sha256(site["model_dir"] / "spine.pt") == file_sha256(site["model_dir"] / "versions" / version / "spine.pt")
    site["v1"] = version

    meta = info(site)
    assert meta["versions"]["serving"]["version"] == version
    assert meta["versions"]["serving"]["per_structure_dice"] == metrics["per_structure_dice"]
    assert [v["version"] for v in meta["versions"]["versions"]] == [version]
    assert meta["versions"]["training"]["running"] is False
    assert meta["models"]["spine"]["model_version"] == version
    # a train request moves the auto-train counters like an automatic run
    auto = meta["auto_train"]
    assert auto["runs_started"] == 1 and auto["final_labels_at_last_start"] == 3 and auto["new_final_labels"] == 0
    assert auto["last_reason"] == "train request"
    assert infer_version(site, cases[4]) == version


def test_candidate_trained_on_corrupted_labels_is_rejected(site):
    model_dir, studies = site["model_dir"], site["studies"]
    split = json.loads((model_dir / "split.json").read_text())
    weights_before = file_sha256(model_dir / "spine.pt")
    for case_id in split["train"]:  # all background; the validation label stays right
        path = studies / "labels" / "final" / f"{case_id}.nii.gz"
        image = nib.load(path)
        write_label(np.zeros(image.shape, np.uint8), image.affine, path)
    try:
        train(site, max_epochs=4)  # fine-tunes the serving model, as an automatic run would
    finally:
        for case_id in split["train"]:
            reference = nib.load(site["reference"] / f"{case_id}_label.nii.gz")
            write_label(np.asanyarray(reference.dataobj), reference.affine,
                        studies / "labels" / "final" / f"{case_id}.nii.gz")

    assert file_sha256(model_dir / "spine.pt") == weights_before
    assert serving(site)["version"] == site["v1"]
    rejected = [m for v, m in stored_versions(site).items() if v != site["v1"]]
    assert len(rejected) == 1 and rejected[0]["promoted"] is False, rejected
    assert " < serving " in rejected[0]["decision"] and rejected[0]["compared_with"]["version"] == site["v1"]
    site["v2"] = rejected[0]["version"]

    meta = info(site)["versions"]
    assert meta["serving"]["version"] == site["v1"]
    listed = {v["version"]: v for v in meta["versions"]}
    assert listed[site["v2"]]["promoted"] is False and listed[site["v2"]]["serving"] is False
    assert meta["history"][-1]["event"] == "rejected" and meta["history"][-1]["version"] == site["v2"]
    assert infer_version(site, site["cases"][4]) == site["v1"]


def test_serving_model_is_measured_again_when_the_validation_images_change(site):
    cases, root = site["cases"], site["root"]
    seed_site = root / "seed-site"
    (seed_site / "images").mkdir(parents=True)
    (seed_site / "labels").mkdir()
    (seed_site / "splits").mkdir()
    (seed_site / "images" / f"{cases[3]}.nii.gz").write_bytes((site["reference"] / f"{cases[3]}.nii.gz").read_bytes())
    (seed_site / "labels" / f"{cases[3]}_seg.nii.gz").write_bytes(
        (site["reference"] / f"{cases[3]}_label.nii.gz").read_bytes())
    (seed_site / "splits" / "val.txt").write_text(f"{cases[3]}\n")
    seeded = subprocess.run([sys.executable, "-m", "lib.seed", str(seed_site), "--studies", str(site["studies"]),
                             "--model-dir", str(site["model_dir"])], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    validation = sorted(json.loads((site["model_dir"] / "split.json").read_text())["validation"])
    assert cases[3] in validation and len(validation) == 2

    train(site, max_epochs=4)
    v1 = stored_versions(site)[site["v1"]]
    assert sorted(v1["evaluations"][-1]["validation_ids"]) == validation  # measured on the new set
    new = [m for v, m in stored_versions(site).items() if v not in (site["v1"], site["v2"])]
    if new:  # the run's best may also be the serving weights themselves: then no new version
        candidate, = new
        assert sorted(candidate["validation_ids"]) == validation
        assert candidate["compared_with"] == {"version": site["v1"], "val_mean_dice": v1["evaluations"][-1]["val_mean_dice"]}
        assert "on the same 2 validation images" in candidate["decision"]
    record = serving(site)
    assert sorted(record["validation_ids"]) == validation and record["val_mean_dice"] is not None


def test_rollback_over_http(site):
    url, model_dir = site["server"].url, site["model_dir"]
    r = requests.post(f"{url}/model/spine/rollback", params={"version": site["v2"]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["serving"]["version"] == site["v2"]
    assert file_sha256(str(model_dir / "spine.pt")) == stored_versions(site)[site["v2"]]["sha256"]
    assert model_version(str(model_dir / "spine.pt")) == site["v2"]
    assert infer_version(site, site["cases"][4]) == site["v2"]
    meta = info(site)["versions"]
    assert meta["serving"]["version"] == site["v2"] and meta["history"][-1]["event"] == "rollback"
    listing = requests.get(f"{url}/model/spine/versions", timeout=30).json()
    assert listing["serving"] == site["v2"] and {site["v1"], site["v2"]} <= {v["version"] for v in listing["versions"]}

    assert requests.post(f"{url}/model/spine/rollback", params={"version": "../x"}, timeout=30).status_code == 422
    assert requests.post(f"{url}/model/spine/rollback", params={"version": "20000101-000000-00000000"},
                         timeout=30).status_code == 404
    assert requests.post(f"{url}/model/other/rollback", params={"version": site["v1"]}, timeout=30).status_code == 404
    assert serving(site)["version"] == site["v2"]  # refused requests changed nothing


def test_rollback_from_the_command_line(site):
    model_dir = site["model_dir"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "lib.versions", *args, "--model-dir", str(model_dir)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    done = cli("rollback", site["v1"])
    assert done.returncode == 0 and site["v1"] in done.stdout, done.stdout + done.stderr
    assert model_version(str(model_dir / "spine.pt")) == site["v1"]
    assert infer_version(site, site["cases"][4]) == site["v1"]
    listed = cli("list")
    assert listed.returncode == 0
    marked = [line for line in listed.stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and site["v1"] in marked[0], listed.stdout
    assert f"{site['v2']}  dice" in listed.stdout and "rejected" in listed.stdout
    assert cli("rollback", "20000101-000000-00000000").returncode == 2
    history = json.loads((model_dir / "versions" / "history.json").read_text())
    assert history[-1]["event"] == "rollback" and history[-1]["by"] == "command line"


def scores(site):
    objects = MONAILabelClient(site["server"].url).datastore()["objects"]
    return objects[site["cases"][4]]["image"]["info"].get(SCORE_KEY, {})


def test_scores_follow_the_model(site):
    # the rollback of the previous test made the server rescore the unlabeled image on its own
    deadline = time.time() + 300
    while scores(site).get("model_version") != site["v1"] and time.time() < deadline:
        time.sleep(2)
    before = scores(site)
    assert before.get("model_version") == site["v1"], before
    # nothing changed: another scoring run rescores nothing
    status = site["server"].run_task("scoring", "epistemic")
    assert status["status"] == "DONE"
    assert scores(site) == before


def test_restart_keeps_versions_split_and_counters(site):
    before = info(site)
    split = (site["model_dir"] / "split.json").read_text()
    site["server"].stop()
    site["server"] = Server(site["studies"], site["model_dir"], workdir=site["root"], conf=CONF)
    after = info(site)
    assert after["versions"]["serving"] == before["versions"]["serving"]
    assert after["versions"]["versions"] == before["versions"]["versions"]
    assert after["versions"]["split"] == before["versions"]["split"]
    assert (site["model_dir"] / "split.json").read_text() == split
    for key in ("runs_started", "final_labels_at_last_start", "last_start", "final_labels", "new_final_labels"):
        assert after["auto_train"][key] == before["auto_train"][key], key
    assert infer_version(site, site["cases"][4]) == site["v1"]
