"""The shipped starter model, over HTTP against real servers with the default plan.

- a site with its own ``model_dir`` starts from the starter weights: ``/info`` says trained,
  the first infer on a sample scan is a real pre-segmentation of the lumbar spine;
- its first training fine-tunes the starter, and the promotion gate measures the starter
  on the site's own validation images;
- ``--conf starter_model false`` starts from scratch.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import REPO, Server, shared_data, small_scan
from lib.lifecycle.model_store import file_sha256, weights_path
from lib.pipeline.plans import SpinePlan

STARTER = REPO / "model" / "spine.pt"
SAMPLE = "spider_98_t2_SPACE"  # in sample-data/, with its reference mask in the development data


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.sum(a & b) / max(1, np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def starter_site(tmp_path_factory):
    if not STARTER.exists():
        pytest.fail(f"the starter model {STARTER} is missing: the repository ships it")
    root = tmp_path_factory.mktemp("starter")
    studies, model_dir = root / "studies", root / "model"
    studies.mkdir()
    shutil.copy(REPO / "sample-data" / f"{SAMPLE}.nii.gz", studies)
    # half the labelled scans validate: the two of the training test give one of each
    server = Server(studies, model_dir, workdir=root,
                    conf={"preset": "default", "val_fraction": "0.5", "val_interval": "1"})
    yield {"server": server, "studies": studies, "model_dir": model_dir, "root": root,
           "client": MONAILabelClient(server.url)}
    server.stop()


def test_shipped_record_names_the_weights_and_the_default_plan():
    record = json.loads((REPO / "model" / "spine.json").read_text())
    assert record["sha256"] == file_sha256(str(STARTER))
    assert record["plan"]["network_mode"] == SpinePlan.from_conf({}).network_mode
    assert STARTER.stat().st_size <= 30 * 2**20
    assert record["val_mean_dice"] > 0.5 and len(record["validation_ids"]) >= 4


def test_a_new_site_serves_the_starter_model(starter_site):
    model_dir = starter_site["model_dir"]
    assert file_sha256(weights_path(str(model_dir))) == file_sha256(str(STARTER))
    info = starter_site["client"].info()["models"]["spine"]
    shipped = json.loads((REPO / "model" / "spine.json").read_text())
    assert info["trained"] is True and info["model_version"] == shipped["version"]


def test_first_infer_is_a_real_pre_segmentation(starter_site):
    """On a sample scan: the canal and all five lumbar vertebrae where the reference has them."""
    reference = nib.load(shared_data() / "labels" / f"{SAMPLE}.nii.gz")
    url = starter_site["server"].url
    r = requests.post(f"{url}/infer/spine", params={"image": SAMPLE, "output": "all"}, timeout=600)
    assert r.status_code == 200, r.text
    from test_server import split_multipart

    result, label_bytes = split_multipart(r)
    path = starter_site["root"] / "pred.nii.gz"
    path.write_bytes(label_bytes)
    pred = np.asanyarray(nib.load(path).dataobj)
    ref = np.asanyarray(reference.dataobj)
    assert pred.shape == ref.shape
    assert _dice(pred == 11, ref == 11) > 0.7
    vertebrae = [_dice(pred == v, ref == v) for v in range(1, 6)]
    assert min(vertebrae) > 0.5, vertebrae
    assert set(result["levels"]["present"]) >= {"L1", "L2", "L3", "L4", "L5"}


def test_training_fine_tunes_the_starter_and_compares_on_site_images(starter_site, tmp_path):
    server, model_dir = starter_site["server"], starter_site["model_dir"]
    starter_version = json.loads((REPO / "model" / "spine.json").read_text())["version"]
    # two labelled site scans: one trains, one validates
    from conftest import reliable_spider_ids
    from test_server import put_label

    for case_id in [c for c in reliable_spider_ids() if c != SAMPLE][:2]:
        image, label = small_scan(case_id, tmp_path, axcodes="LPS", lr_step=2, inplane_step=2)
        r = requests.put(f"{server.url}/datastore/", params={"image": case_id},
                         files={"file": (image.name, image.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        r = put_label(server.url, case_id, label)
        assert r.status_code == 200, r.text
    status = server.run_task("train", "spine", {"max_epochs": 1, "train_batch_size": 1})
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    versions = sorted((model_dir / "versions").glob("*/metrics.json"))
    candidates = [json.loads(p.read_text()) for p in versions]
    trained = [m for m in candidates if m.get("source") == "training"]
    assert trained, candidates
    assert trained[-1]["trained_from"] == starter_version
    assert trained[-1]["compared_with"]["version"] == starter_version
    assert trained[-1]["plan"]["network_mode"] == "2.5d"
    starter = next(m for m in candidates if m["version"] == starter_version)
    # the starter was measured again on this site's validation image before the comparison
    assert trained[-1]["validation_ids"] and "evaluations" in starter, candidates
    assert starter["evaluations"][-1]["validation_ids"] == trained[-1]["validation_ids"]
    # compared on one site image only, the candidate does not replace the starter (the gate's minimum)
    assert trained[-1]["promoted"] is False and "starter model keeps serving" in trained[-1]["decision"], trained[-1]
    assert json.loads((model_dir / "spine.json").read_text())["version"] == starter_version


def test_starter_model_false_starts_from_scratch(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(REPO / "sample-data" / f"{SAMPLE}.nii.gz", studies)
    server = Server(studies, tmp_path / "model", workdir=tmp_path,
                    conf={"preset": "default", "starter_model": "false"})
    try:
        info = MONAILabelClient(server.url).info()["models"]["spine"]
        assert info["trained"] is False
        assert not (tmp_path / "model" / "spine.pt").exists()
    finally:
        server.stop()


def test_weights_of_another_plan_are_refused_over_http(tmp_path):
    """A 3D server pointed at the 2.5D starter weights answers 409 with the reason, and keeps
    the weights and the studies folder as they were."""
    from conftest import snapshot

    studies, model_dir = tmp_path / "studies", tmp_path / "model"
    studies.mkdir()
    model_dir.mkdir()
    shutil.copy(REPO / "sample-data" / f"{SAMPLE}.nii.gz", studies)
    shutil.copy(STARTER, model_dir / "spine.pt")
    shutil.copy(REPO / "model" / "spine.json", model_dir / "spine.json")
    server = Server(studies, model_dir, workdir=tmp_path, conf={"preset": "3d", "depths": "1,1,1,1"})
    try:
        before = snapshot(studies)
        r = requests.post(f"{server.url}/infer/spine", params={"image": SAMPLE, "output": "json"}, timeout=120)
        assert r.status_code == 409, r.text
        assert "another plan" in r.text and "network_mode" in r.text
        assert snapshot(studies) == before
        assert file_sha256(str(model_dir / "spine.pt")) == file_sha256(str(STARTER))
    finally:
        server.stop()
