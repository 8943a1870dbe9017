"""The spine app end to end, over HTTP, against a real MONAI Label server.

One server (tiny preset, its own model and studies folders) goes through the life of a
site: untrained -> labels saved from "Slicer" -> one training epoch -> pre-segmentation
of uploads in several formats -> epistemic scoring and next-sample. The tests run in
file order and each checks one step.
"""

from __future__ import annotations

import json
import time
import zipfile

import nibabel as nib
import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from conftest import Server, reliable_spider_ids, small_scan, snapshot
from lib.lifecycle.model_store import model_version
from lib.pipeline.labels import LABELS, NAMES, NUM_CLASSES

ORIENTATIONS = ["LPS", "PIR", "RAS"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    studies, model_dir, reference = root / "studies", root / "model", root / "reference"
    cases = reliable_spider_ids()[:3]
    for case_id, axcodes in zip(cases, ORIENTATIONS):
        image, label = small_scan(case_id, reference, axcodes=axcodes)
        studies.mkdir(exist_ok=True)
        (studies / image.name).write_bytes(image.read_bytes())
    server = Server(studies, model_dir, workdir=root)
    yield {"server": server, "studies": studies, "model_dir": model_dir, "reference": reference, "cases": cases,
           "client": MONAILabelClient(server.url), "root": root}
    server.stop()


def slicer_label_file(reference_label, path, order):
    """A labelmap as 3D Slicer exports it: values 1..N in segment order, plus label_info."""
    img = nib.load(reference_label)
    ours = np.asanyarray(img.dataobj)
    present = [v for v in order if np.any(ours == v)]
    slicer = np.zeros_like(ours)
    for slicer_value, our_value in enumerate(present, start=1):
        slicer[ours == our_value] = slicer_value
    out = nib.Nifti1Image(slicer.astype(np.uint8), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    nib.save(out, path)
    # Slicer's idx counts a skipped background segment: off by one on purpose
    return [{"name": NAMES[v], "idx": i + 2} for i, v in enumerate(present)]


def put_label(url, image_id, path, label_info=None, tag="final"):
    params = {"label_info": label_info} if label_info is not None else {}
    with open(path, "rb") as f:
        return requests.put(
            f"{url}/datastore/label",
            params={"image": image_id, "tag": tag},
            data={"params": json.dumps(params)},
            files={"label": (path.name, f)},
            timeout=60,
        )


def infer_upload(url, path, params=None):
    with open(path, "rb") as f:
        return requests.post(
            f"{url}/infer/spine",
            params={"output": "all"},
            data={"params": json.dumps(params or {})},
            files={"file": (path.name, f)},
            timeout=600,
        )


def split_multipart(response):
    """(result JSON, label bytes) of an ``output=all`` answer."""
    from requests_toolbelt.multipart import decoder

    parts = decoder.MultipartDecoder.from_response(response).parts
    params, image = None, None
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.text)
        elif 'name="image"' in disposition:
            image = part.content
    return params, image


# --- 1. a new site: no weights ------------------------------------------------------


def test_info_lists_spine_with_the_label_table(site):
    info = site["client"].info()
    model = info["models"]["spine"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == LABELS and len(model["labels"]) == NUM_CLASSES == 12
    assert sorted(model["labels"].values()) == list(range(12))  # Slicer needs contiguous values
    assert model["trained"] is False
    assert set(info["strategies"]) >= {"epistemic", "random", "first"}
    assert "epistemic" in info["scoring"]


def test_untrained_infer_is_a_clear_error(site):
    image_id = site["cases"][0]
    r = requests.post(f"{site['server'].url}/infer/spine", params={"image": image_id, "output": "json"}, timeout=60)
    assert r.status_code == 409
    assert "no trained weights" in r.json()["detail"]


def test_strategies_work_without_a_model(site):
    url = site["server"].url
    for strategy in ("random", "first", "epistemic"):
        r = requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["id"] in site["cases"]
    assert requests.post(f"{url}/activelearning/first", json={}, timeout=30).json()["id"] == sorted(site["cases"])[0]


# --- 2. labels from Slicer ----------------------------------------------------------


def test_slicer_label_is_remapped_by_name(site):
    url, reference = site["server"].url, site["reference"]
    for case_id in site["cases"][:2]:
        gt_path = reference / f"{case_id}_label.nii.gz"
        order = [11, 3, 1, 10, 2, 6, 7, 8, 9, 4, 5]  # segment order in Slicer is arbitrary
        slicer_path = site["root"] / f"{case_id}_slicer.nii.gz"
        label_info = slicer_label_file(gt_path, slicer_path, order)
        r = put_label(url, case_id, slicer_path, label_info)
        assert r.status_code == 200, r.text
        stored = site["studies"] / "labels" / "final" / f"{case_id}.nii.gz"
        stored_img, gt_img = nib.load(stored), nib.load(gt_path)
        assert np.array_equal(np.asanyarray(stored_img.dataobj), np.asanyarray(gt_img.dataobj))
        assert np.allclose(stored_img.affine, gt_img.affine, atol=1e-4)


@pytest.mark.parametrize(
    "defect, status, message",
    [
        ("shape", 422, "shape"),
        ("affine", 422, "geometry"),
        ("unknown_name", 422, "unknown segment names"),
        ("value_out_of_range", 422, "outside"),
        ("unknown_image", 404, "unknown image"),
        ("bad_tag", 422, "tag"),
        ("not_an_image", 422, "cannot read"),
    ],
)
def test_bad_labels_are_refused_and_nothing_is_written(site, defect, status, message):
    url, studies, reference = site["server"].url, site["studies"], site["reference"]
    case_id = site["cases"][2]  # still unlabelled
    gt = nib.load(reference / f"{case_id}_label.nii.gz")
    array, affine = np.asanyarray(gt.dataobj).copy(), gt.affine.copy()
    label_info, image_id, tag = None, case_id, "final"
    if defect == "shape":
        array = array[:, :-1]
    elif defect == "affine":
        affine[:3, 3] += 5.0
    elif defect == "unknown_name":
        label_info = [{"name": "T12", "idx": 1}] + [{"name": NAMES[v], "idx": v + 1} for v in range(2, 12)]
    elif defect == "value_out_of_range":
        array[0, 0, 0] = 42
    elif defect == "unknown_image":
        image_id = "no_such_scan"
    elif defect == "bad_tag":
        tag = "../../etc"
    path = site["root"] / f"bad_{defect}.nii.gz"
    if defect == "not_an_image":
        path.write_bytes(b"this is not a NIfTI file" * 10)
    else:
        nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), path)
    before = snapshot(studies)
    r = put_label(url, image_id, path, label_info, tag=tag)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert snapshot(studies) == before
    assert requests.get(f"{url}/info/", timeout=10).status_code == 200


# --- 3. training --------------------------------------------------------------------


def test_one_tiny_epoch_publishes_weights(site):
    server, model_dir = site["server"], site["model_dir"]
    r = requests.post(f"{server.url}/train/spine", json={}, timeout=60)
    assert r.status_code == 200, r.text  # nothing else trains: must start
    status = server.wait_for_task("train")
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    assert (model_dir / "spine.pt").exists()
    stats = json.loads((model_dir / "train_stats.json").read_text())
    assert stats["epoch"] == 1 and stats["total_epochs"] == 1
    assert list((model_dir / "runs").rglob("events.out.tfevents.*")), "no TensorBoard events written"
    split = json.loads((model_dir / "split.json").read_text())
    assert sorted(split["train"] + split["validation"]) == sorted(site["cases"][:2])
    info = site["client"].info()
    assert info["models"]["spine"]["trained"] is True
    assert info["models"]["spine"]["model_version"] == model_version(str(model_dir / "spine.pt"))


# --- 4. pre-segmentation of real scans in several formats -----------------------------


def test_infer_on_anisotropic_lps_nifti_keeps_shape_and_affine(site):
    case_id = site["cases"][0]
    path = site["reference"] / f"{case_id}.nii.gz"
    source = nib.load(path)
    assert nib.aff2axcodes(source.affine) == ("L", "P", "S")
    r = infer_upload(site["server"].url, path)
    assert r.status_code == 200, r.text
    result, label_bytes = split_multipart(r)
    out = site["root"] / "pred_lps.nii.gz"
    out.write_bytes(label_bytes)
    pred = nib.load(out)
    assert pred.shape == source.shape
    assert np.allclose(pred.affine, source.affine, atol=1e-3)
    values = np.unique(np.asanyarray(pred.dataobj))
    assert set(values.tolist()) <= set(range(12))
    assert result["label_names"] == LABELS
    assert set(result["volumes_ml"]) == set(LABELS) - {"background"}
    assert {"consistent", "missing", "messages", "lateral_removed_ml"} <= set(result["levels"])
    removed = result["levels"]["lateral_removed_ml"]  # the midline prior's report
    assert set(removed) <= set(LABELS) - {"background"} and all(v > 0 for v in removed.values())
    assert result["model_version"] == model_version(str(site["model_dir"] / "spine.pt"))


def test_infer_on_nrrd(site, tmp_path):
    import itk

    case_id = site["cases"][1]
    source = itk.imread(str(site["reference"] / f"{case_id}.nii.gz"))
    path = tmp_path / f"{case_id}.nrrd"
    itk.imwrite(source, str(path))
    r = infer_upload(site["server"].url, path, {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert r.status_code == 200, r.text
    _, label_bytes = split_multipart(r)
    out = tmp_path / "pred.nrrd"
    out.write_bytes(label_bytes)
    pred = itk.imread(str(out))
    assert tuple(pred.GetLargestPossibleRegion().GetSize()) == tuple(source.GetLargestPossibleRegion().GetSize())
    assert np.allclose(np.asarray(pred.GetOrigin()), np.asarray(source.GetOrigin()), atol=1e-3)
    assert np.allclose(np.asarray(pred.GetSpacing()), np.asarray(source.GetSpacing()), atol=1e-4)
    assert np.allclose(itk.array_from_matrix(pred.GetDirection()), itk.array_from_matrix(source.GetDirection()))


def test_infer_on_a_zipped_dicom_series(site, tmp_path):
    from lib.pipeline.dicom import write_dicom_series
    from lib.pipeline.io import read_volume

    case_id = site["cases"][2]
    array, affine = read_volume(site["reference"] / f"{case_id}.nii.gz")
    series = tmp_path / "series"
    write_dicom_series(array, affine, str(series))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"series/{f.name}")
    expected_shape, expected_affine = read_volume(series)[0].shape, read_volume(series)[1]
    r = infer_upload(site["server"].url, archive)
    assert r.status_code == 200, r.text
    _, label_bytes = split_multipart(r)
    out = tmp_path / "pred.nii.gz"
    out.write_bytes(label_bytes)
    pred, pred_affine = read_volume(out)
    assert pred.shape == expected_shape
    assert np.allclose(pred_affine, expected_affine, atol=1e-3)


def test_corrupt_upload_is_refused(site, tmp_path):
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes((site["reference"] / f"{site['cases'][0]}.nii.gz").read_bytes()[:500])
    r = infer_upload(site["server"].url, path)
    assert r.status_code == 422, r.text
    assert "cannot read" in r.json()["detail"]


# --- 5. active learning -------------------------------------------------------------


def test_epistemic_scoring_and_next_sample(site):
    server, client = site["server"], site["client"]
    status = server.run_task("scoring", "epistemic")  # training may already have started one
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    unlabeled = site["cases"][2:]
    version = model_version(str(site["model_dir"] / "spine.pt"))

    def scores_seen_by_server():
        # the scoring subprocess writes .datastore.json; the server reloads it on the file event
        objects = client.datastore()["objects"]
        infos = {i: objects[i]["image"]["info"].get("epistemic_spine", {}) for i in unlabeled}
        return infos if all(info.get("model_version") == version for info in infos.values()) else None

    deadline = time.time() + 30
    while (infos := scores_seen_by_server()) is None and time.time() < deadline:
        time.sleep(1)
    assert infos is not None, f"scores for model {version} not visible: {client.datastore()['objects']}"
    scores = {image_id: info["score"] for image_id, info in infos.items()}
    assert all(np.isfinite(list(scores.values())))
    answer = requests.post(f"{server.url}/activelearning/epistemic", json={"count": 5}, timeout=30).json()
    assert answer["ids"] == sorted(scores, key=lambda i: -scores[i])
    assert answer["id"] == answer["ids"][0]
    # each score comes with its per-structure profile, which epistemic_diverse compares
    assert all(len(info["profile"]) == NUM_CLASSES - 1 for info in infos.values())
    diverse = requests.post(f"{server.url}/activelearning/epistemic_diverse", json={"count": 5}, timeout=30).json()
    assert diverse["round"] == 0  # the labelled scans were labelled before this model scored anything
    assert diverse["id"] == answer["id"] and sorted(diverse["ids"]) == sorted(unlabeled)


def test_infer_uses_the_weights_published_by_training(site, tmp_path):
    """The network that ran is the published one: the server's label equals what those weights
    give in this process, and differs from what other weights of the same plan give."""
    import torch

    from lib.pipeline.networks import build_network
    from lib.pipeline.plans import SpinePlan
    from lib.segment import SpineSegmenter

    weights = site["model_dir"] / "spine.pt"
    path = site["reference"] / f"{site['cases'][2]}.nii.gz"
    r = infer_upload(site["server"].url, path)
    assert r.status_code == 200, r.text
    result, label_bytes = split_multipart(r)
    assert result["model_version"] == model_version(str(weights))
    (tmp_path / "served.nii.gz").write_bytes(label_bytes)
    served = np.asanyarray(nib.load(tmp_path / "served.nii.gz").dataobj)
    published = SpineSegmenter(str(weights), {"preset": "tiny"}, "cpu").segment(path).label
    torch.manual_seed(123)
    torch.save(build_network(SpinePlan.from_conf({"preset": "tiny"})).state_dict(), tmp_path / "other.pt")
    other = SpineSegmenter(str(tmp_path / "other.pt"), {"preset": "tiny"}, "cpu").segment(path).label
    assert np.mean(served == published) > 0.999
    assert np.mean(served == other) < 0.99 and not np.array_equal(published, other)


def test_a_warm_server_does_not_reload_the_model(site):
    path = site["reference"] / f"{site['cases'][0]}.nii.gz"
    results = []
    for _ in range(2):
        r = infer_upload(site["server"].url, path)
        assert r.status_code == 200, r.text
        results.append(split_multipart(r)[0])
    assert results[1]["model_loaded"] is False  # the second infer of the same scan reuses the loaded network
    assert results[0]["model_version"] == results[1]["model_version"]


def test_unknown_image_id_is_404(site):
    r = requests.post(f"{site['server'].url}/infer/spine", params={"image": "nope", "output": "json"}, timeout=60)
    assert r.status_code == 404


def test_cors_is_closed_to_other_origins(site):
    url = site["server"].url
    r = requests.get(f"{url}/info/", headers={"Origin": "http://evil.example"}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = requests.options(f"{url}/datastore/label", timeout=10, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"})
    assert "access-control-allow-origin" not in preflight.headers
