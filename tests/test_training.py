"""The train task on a real datastore folder (no server): validation, persisted split, resume."""

from __future__ import annotations

import json
import shutil

from monailabel.datastore.local import LocalDatastore

from conftest import reliable_spider_ids, small_scan
from lib.lifecycle.model_store import file_sha256
from lib.pipeline.plans import SpinePlan
from lib.trainers.spine import SpineTrainTask


def make_datastore(root, case_ids):
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for case_id in case_ids:
        image, label = small_scan(case_id, root / "ref", axcodes="PIR", lr_step=4, inplane_step=4)
        shutil.copy(image, studies / image.name)
        shutil.copy(label, studies / "labels" / "final" / image.name)
    return LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)


def test_training_validates_on_a_fixed_split_and_fine_tunes(tmp_path):
    cases = reliable_spider_ids()[:6]
    model_dir = tmp_path / "model"
    plan = SpinePlan.from_conf({"preset": "tiny", "max_epochs": "2", "val_interval": "1"})
    datastore = make_datastore(tmp_path, cases[:5])

    assert SpineTrainTask(str(model_dir), plan).load_path("unused") is None  # bootstrap: from scratch
    stats = SpineTrainTask(str(model_dir), plan)({}, datastore)
    split = json.loads((model_dir / "split.json").read_text())
    assert len(split["validation"]) == 1 and len(split["train"]) == 4
    assert stats["epoch"] == 2
    assert "val_mean_dice" in stats["eval"]["metrics"]
    assert (model_dir / "spine.pt").exists()

    serving = json.loads((model_dir / "spine.json").read_text())
    assert serving["validation_ids"] == split["validation"] and 0 <= serving["val_mean_dice"] <= 1

    # the next run fine-tunes from the serving weights
    assert SpineTrainTask(str(model_dir), plan).load_path("unused") == str(model_dir / "spine.pt")

    # a candidate that does worse on the same validation images never replaces the serving model
    weights_before = file_sha256(model_dir / "spine.pt")
    (model_dir / "spine.json").write_text(json.dumps({**serving, "val_mean_dice": 1.5}))
    SpineTrainTask(str(model_dir), plan)({}, datastore)
    assert file_sha256(model_dir / "spine.pt") == weights_before
    assert json.loads((model_dir / "spine.json").read_text())["val_mean_dice"] == 1.5

    # a sixth label arrives: the validation image stays, nothing moves from validation to train
    datastore = make_datastore(tmp_path, cases)
    SpineTrainTask(str(model_dir), plan)({}, datastore)
    split2 = json.loads((model_dir / "split.json").read_text())
    assert set(split["validation"]) <= set(split2["validation"])
    assert not set(split2["validation"]) & set(split2["train"])
    assert sorted(split2["train"] + split2["validation"]) == sorted(cases)
