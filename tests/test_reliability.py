"""Bad input, crashes, load and access, against a real server over HTTP: nothing lost.

One tiny server (random-init tiny weights, synthetic scans, ``max_upload_mb 1``, one infer
at a time with two waiting) gets path tricks, broken and hostile images (DICOM size bombs
included), oversized uploads, concurrent load and more infers than it admits; its
training subprocess is killed mid-run; then it is restarted on the same studies folder.
The atomic-write primitives are tested directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
import torch

from conftest import REPO, Server, snapshot
from lib.pipeline.io import atomic_output, atomic_write_text, remove_stale_partials

TOKEN = "escape7f3a"  # every trick names this: a file with it anywhere means something got out
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
MAX_RUNNING, MAX_QUEUED = 1, 2
SITE_CONF = {"max_upload_mb": 1, "max_concurrent_infers": MAX_RUNNING, "max_queued_infers": MAX_QUEUED}


def nifti(path: Path, array: np.ndarray, affine=AFFINE) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def scan(shape=(40, 40, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(300, 50, shape) + 500 * (np.indices(shape)[0] > shape[0] // 2)).astype(np.int16)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from lib.pipeline.networks import build_network
    from lib.pipeline.plans import SpinePlan

    root = tmp_path_factory.mktemp("reliability")
    sandbox, model_dir, files = root / "sandbox", root / "model", root / "files"
    studies = sandbox / "studies"
    for folder in (studies / "labels" / "final", model_dir, files):
        folder.mkdir(parents=True)
    for i, image_id in enumerate(("scan_a", "scan_b")):
        nifti(studies / f"{image_id}.nii.gz", scan(seed=i))
    label = np.zeros((40, 40, 20), np.uint8)
    label[10:20, 10:20, 5:10], label[20:30, 10:20, 5:10] = 1, 6
    nifti(studies / "labels" / "final" / "scan_a.nii.gz", label)
    torch.save(build_network(SpinePlan.from_conf({"preset": "tiny"})).state_dict(), model_dir / "spine.pt")
    state = {"root": root, "sandbox": sandbox, "studies": studies, "model_dir": model_dir, "files": files}
    state["server"] = Server(studies, model_dir, workdir=root, conf=SITE_CONF)
    # the model serves from the start, so the server scores the unlabelled scan in the
    # background and writes the score into the datastore: wait for that before any test
    # compares the studies folder before and after a request
    state["server"].wait_for_task("scoring", timeout=300)
    yield state
    state["server"].stop()


def alive(url: str) -> bool:
    return requests.get(f"{url}/info/", timeout=30).status_code == 200


def escaped(site) -> list:
    """Files or folders named with TOKEN outside the studies folder (here or in /tmp)."""
    found = [p for p in site["root"].rglob(f"*{TOKEN}*") if site["studies"] not in p.parents]
    return found + list(Path("/tmp").glob(f"*{TOKEN}*")) + list(Path("/").glob(f"*{TOKEN}*"))


# --- 1. path tricks -------------------------------------------------------------------

TRICKS = [f"../{TOKEN}", f"../../{TOKEN}", f"/tmp/{TOKEN}", f"%2F..%2F{TOKEN}", f"..%2F{TOKEN}",
          f"..\\..\\{TOKEN}", f"{TOKEN}\x00.nii.gz", f"sub/{TOKEN}", "..", ".", f" {TOKEN}", f"{TOKEN}\n",
          f"ü{TOKEN}", TOKEN * 20]


@pytest.mark.parametrize("trick", TRICKS, ids=range(len(TRICKS)))
def test_path_tricks_are_refused(site, trick):
    url = site["server"].url
    probe = nifti(site["files"] / "probe.nii.gz", scan(seed=3))
    before = snapshot(site["sandbox"])
    answers = {
        "add image": requests.put(f"{url}/datastore/", params={"image": trick},
                                  files={"file": ("probe.nii.gz", probe.read_bytes())}, timeout=60),
        "save label": requests.put(f"{url}/datastore/label", params={"image": trick, "tag": "final"},
                                   files={"label": ("l.nii.gz", probe.read_bytes())}, timeout=60),
        "label tag": requests.put(f"{url}/datastore/label", params={"image": "scan_a", "tag": trick},
                                  files={"label": ("l.nii.gz", probe.read_bytes())}, timeout=60),
        "get image": requests.get(f"{url}/datastore/image", params={"image": trick}, timeout=30),
        "image info": requests.get(f"{url}/datastore/image/info", params={"image": trick}, timeout=30),
        "put info": requests.put(f"{url}/datastore/image/info", params={"image": trick}, data={"info": "{}"},
                                 timeout=30),
        "get label": requests.get(f"{url}/datastore/label", params={"label": trick, "tag": "final"}, timeout=30),
        "get tag": requests.get(f"{url}/datastore/label", params={"label": "scan_a", "tag": trick}, timeout=30),
        "delete image": requests.delete(f"{url}/datastore/image", params={"id": trick}, timeout=30),
        "delete label": requests.delete(f"{url}/datastore/label", params={"id": "scan_a", "tag": trick}, timeout=30),
        "infer": requests.post(f"{url}/infer/spine", params={"image": trick, "output": "json"}, timeout=60),
    }
    for what, r in answers.items():
        assert 400 <= r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    assert snapshot(site["sandbox"]) == before
    assert not escaped(site)
    assert alive(url)


def test_url_encoded_separators_in_the_raw_query(site):
    """``%2F`` decoded by the server itself (requests would encode the '%')."""
    url = site["server"].url
    probe = nifti(site["files"] / "probe.nii.gz", scan(seed=3))
    before = snapshot(site["sandbox"])
    for query in (f"image=..%2F{TOKEN}", f"image=%2E%2E%2F%2E%2E%2F{TOKEN}", f"image={TOKEN}%00x", f"image=..%5C{TOKEN}"):
        r = requests.put(f"{url}/datastore/?{query}", files={"file": ("probe.nii.gz", probe.read_bytes())}, timeout=60)
        assert 400 <= r.status_code < 500, (query, r.status_code, r.text)
        assert 400 <= requests.get(f"{url}/datastore/image?{query}", timeout=30).status_code < 500
    assert snapshot(site["sandbox"]) == before
    assert not escaped(site)


@pytest.mark.parametrize("filename", [f"../../{TOKEN}.nii.gz", f"/tmp/{TOKEN}.nii.gz", f"..\\{TOKEN}.nii.gz",
                                      f"{TOKEN}.exe", f"{TOKEN}.mhd"])
def test_uploaded_file_names_stay_inside(site, filename):
    """No ``image`` id: MONAI Label derives it from the file name; it must land inside or be refused."""
    url, studies = site["server"].url, site["studies"]
    probe = nifti(site["files"] / "probe.nii.gz", scan(seed=4))
    r = requests.put(f"{url}/datastore/", files={"file": (filename, probe.read_bytes())}, timeout=60)
    assert r.status_code in (200, 409, 422), r.text
    if r.status_code == 200:
        image_id = r.json()["image"]
        assert any(p.parent == studies for p in studies.glob(f"{image_id}.*"))
        assert requests.delete(f"{url}/datastore/image", params={"id": image_id}, timeout=30).status_code == 200
        # gone from the index when the answer comes, not later when the file watcher runs
        assert image_id not in json.loads((studies / "datastore_v2.json").read_text())["objects"]
        listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
        assert image_id not in listed["objects"]
    assert not escaped(site)
    assert alive(url)


def test_infer_refuses_server_paths_in_params(site):
    url = site["server"].url
    secret = site["root"] / f"{TOKEN}_outside.nii.gz"
    nifti(secret, scan(seed=5))
    for params in ({"image": str(secret)}, {"label": "/etc/passwd"}, {"result_extension": "/../../x"},
                   {"save_label": True, "label_tag": "final"}):
        r = requests.post(f"{url}/infer/spine", params={"image": "scan_b", "output": "json"},
                          data={"params": json.dumps(params)}, timeout=120)
        assert r.status_code == 422, (params, r.status_code, r.text[:300])
    secret.unlink()


def test_existing_image_is_not_replaced(site):
    url, studies = site["server"].url, site["studies"]
    before = snapshot(studies)
    probe = nifti(site["files"] / "probe.nii.gz", scan(seed=6))
    r = requests.put(f"{url}/datastore/", params={"image": "scan_a"}, files={"file": ("x.nii.gz", probe.read_bytes())},
                     timeout=60)
    assert r.status_code == 409 and "exists already" in r.json()["detail"]
    assert snapshot(studies) == before


# --- 2. bad images --------------------------------------------------------------------


def bad_file(kind: str, folder: Path) -> Path:
    """A broken or hostile image of the given kind."""
    good = nifti(folder / "good.nii.gz", scan(seed=7))
    raw = folder / "good.nii"
    nib.save(nib.load(good), raw)
    path = folder / {"empty": "empty.nii.gz", "truncated_gz": "t.nii.gz", "truncated_nii": "t.nii",
                     "corrupt_nrrd": "c.nrrd", "nrrd_external": "e.nrrd", "flat_2d": "flat.nii.gz",
                     "frames_4d": "frames.nii.gz", "nan": "nan.nii.gz", "inf": "inf.nii.gz", "bomb_nifti": "bomb.nii",
                     "bomb_nrrd": "bomb.nrrd", "bomb_mha": "bomb.mha"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_gz":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "truncated_nii":
        path.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    elif kind == "corrupt_nrrd":
        path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 40 40 x\nencoding: raw\n\n" + os.urandom(500))
    elif kind == "nrrd_external":
        path.write_bytes(b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: /etc/passwd\n\n")
    elif kind == "flat_2d":
        nifti(path, scan((40, 40, 1))[..., 0])
    elif kind == "frames_4d":
        nifti(path, np.stack([scan((20, 20, 10), seed=s) for s in range(3)], axis=-1))
    elif kind in ("nan", "inf"):
        array = scan().astype(np.float32)
        array[5, 5, 5] = np.nan if kind == "nan" else np.inf
        nifti(path, array)
    elif kind == "bomb_nifti":  # NIfTI-1 dims are int16: 30000^3 = 2.7e13 voxels in a 400-byte file
        header = nib.Nifti1Header()
        header.set_data_dtype(np.uint8)
        header.set_data_shape((30000, 30000, 30000))
        header["vox_offset"] = 352
        path.write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 64)
    elif kind == "bomb_nrrd":
        path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n\n" + b"\0" * 64)
    elif kind == "bomb_mha":
        path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_FLOAT\n"
                         b"ElementDataFile = LOCAL\n" + b"\0" * 64)
    return path


BAD = {  # kind -> words the refusal must contain
    "empty": "empty", "truncated_gz": "truncated", "truncated_nii": "truncated", "corrupt_nrrd": "nrrd",
    "nrrd_external": "separate data file", "flat_2d": "3D", "frames_4d": "3D", "nan": "NaN", "inf": "infinite",
    "bomb_nifti": "over the limit", "bomb_nrrd": "over the limit", "bomb_mha": "over the limit",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_images_are_refused_quickly_and_nothing_changes(site, kind, tmp_path):
    url, studies = site["server"].url, site["studies"]
    path = bad_file(kind, tmp_path)
    before = snapshot(studies)
    for endpoint in ("add image", "infer"):
        start = time.monotonic()
        with open(path, "rb") as f:
            if endpoint == "add image":
                r = requests.put(f"{url}/datastore/", params={"image": f"bad_{kind}"}, files={"file": (path.name, f)},
                                 timeout=120)
            else:
                r = requests.post(f"{url}/infer/spine", params={"output": "json"}, files={"file": (path.name, f)},
                                  timeout=120)
        elapsed = time.monotonic() - start
        assert 400 <= r.status_code < 500, f"{endpoint}: {r.status_code} {r.text[:300]}"
        detail = r.json()["detail"]
        assert BAD[kind].lower() in str(detail).lower(), f"{endpoint}: {detail}"
        assert elapsed < 30, f"{endpoint} took {elapsed:.1f} s"
    assert snapshot(studies) == before
    assert alive(url)


def dicom_zip(folder: Path, rows_columns=None) -> Path:
    """A zipped MR series of ``scan()``; ``rows_columns``: what every slice's header claims instead."""
    import pydicom

    from lib.pipeline.dicom import write_dicom_series

    series = folder / "series"
    paths = write_dicom_series(scan(seed=9), AFFINE, str(series))
    if rows_columns:
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.Rows, ds.Columns = rows_columns  # the pixel data stays 40 x 40
            ds.save_as(path)
    archive = folder / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in paths:
            zf.write(path, f"series/{Path(path).name}")
    return archive


def test_dicom_slices_claiming_huge_sizes_are_refused(site, tmp_path):
    """20 slices of a few kB each claim 60000 x 60000 pixels: ITK would allocate 144 GB."""
    url, studies = site["server"].url, site["studies"]
    bomb = dicom_zip(tmp_path, rows_columns=(60000, 60000))
    assert bomb.stat().st_size < 2**20
    before = snapshot(studies)
    r = requests.post(f"{url}/infer/spine", params={"output": "json"}, files={"file": ("series.zip", bomb.read_bytes())},
                      timeout=120)
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert "over the limit" in r.json()["detail"] and "DICOM" in r.json()["detail"]
    assert snapshot(studies) == before
    assert alive(url)
    honest = dicom_zip(tmp_path / "honest")
    r = requests.post(f"{url}/infer/spine", params={"output": "json"},
                      files={"file": ("series.zip", honest.read_bytes())}, timeout=300)
    assert r.status_code == 200, r.text[:300]


def test_uploads_over_max_upload_mb_get_413(site, tmp_path):
    url, studies = site["server"].url, site["studies"]
    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom(int(1.5 * 2**20)))
    before = snapshot(studies)
    for method, endpoint, field in (("put", "/datastore/?image=big", "file"), ("post", "/infer/spine", "file"),
                                    ("put", "/datastore/label?image=scan_a&tag=final", "label")):
        r = requests.request(method, f"{url}{endpoint}", files={field: (big.name, big.read_bytes())}, timeout=60)
        assert r.status_code == 413, (endpoint, r.status_code, r.text[:300])
        assert "max_upload_mb" in r.json()["detail"]
    assert snapshot(studies) == before
    assert alive(url)


def test_a_good_upload_is_stored_and_served(site):
    url, studies = site["server"].url, site["studies"]
    probe = nifti(site["files"] / "fine.nii.gz", scan(seed=8))
    r = requests.put(f"{url}/datastore/", params={"image": "scan_c"}, files={"file": ("fine.nii.gz", probe.read_bytes())},
                     timeout=60)
    assert r.status_code == 200, r.text
    assert (studies / "scan_c.nii.gz").read_bytes() == probe.read_bytes()
    assert requests.get(f"{url}/datastore/image", params={"image": "scan_c"}, timeout=30).content == probe.read_bytes()
    assert not [p for p in studies.rglob(".partial-*")]


# --- 3. durability ----------------------------------------------------------------------


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "datastore_v2.json"
    dest.write_text("old")

    def crash(*_):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write_text(dest, "new" * 1000)
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datastore_v2.json"]


def test_killed_writer_leaves_the_old_file(tmp_path):
    """SIGKILL between write and rename: the old label stays; the leftover is hidden and cleaned."""
    dest = tmp_path / "scan_a.nii.gz"
    dest.write_bytes(b"old label")
    code = (f"import os, signal\nfrom lib.pipeline.io import atomic_output\n"
            f"with atomic_output({str(dest)!r}) as tmp:\n"
            f"    open(tmp, 'wb').write(b'new label, half written')\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert dest.read_bytes() == b"old label"
    leftovers = [p.name for p in tmp_path.iterdir() if p != dest]
    assert leftovers and all(name.startswith(".partial-") for name in leftovers)
    assert len(remove_stale_partials(str(tmp_path), max_age_s=0)) == len(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


def test_atomic_output_replaces_in_one_step(tmp_path):
    dest = tmp_path / "label.nii.gz"
    dest.write_bytes(b"old")
    with atomic_output(dest) as tmp:
        assert Path(tmp).name == dest.name and Path(tmp).parent.parent == tmp_path
        Path(tmp).write_bytes(b"new")
        assert dest.read_bytes() == b"old"
    assert dest.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


# --- 4. load ------------------------------------------------------------------------------


def test_loadtest_refuses_other_hosts():
    from lib.loadtest import require_loopback

    with pytest.raises(ValueError, match="loopback"):
        require_loopback("http://10.1.2.3:8000")
    assert require_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"


def test_load_every_request_succeeds_or_is_turned_away(site):
    url, studies = site["server"].url, site["studies"]
    label_path = studies / "labels" / "final" / "scan_a.nii.gz"
    label_before = np.asanyarray(nib.load(label_path).dataobj).copy()
    proc = subprocess.run([sys.executable, "-m", "lib.loadtest", "--url", url, "--clients", "4", "--seconds", "6",
                           "--max-requests", "40", "--timeout", "120", "--label-share", "0.4", "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    summary, memory = report["summary"], report["server_memory"]
    assert summary["infer"]["count"] > 0 and summary["label"]["count"] > 0, summary
    # the server's own process was found on the port and measured through the load
    server = psutil.Process(site["server"].proc.pid)
    assert memory and memory["pid"] in {server.pid} | {c.pid for c in server.children(recursive=True)}, memory
    assert 0 < memory["start_mb"] <= memory["peak_mb"] and memory["end_mb"] <= memory["peak_mb"], memory
    for kind, s in summary.items():
        assert set(s["statuses"]) <= {"200", "429", "503"}, (kind, s)
        assert s["ok"] > 0, (kind, s)
    assert alive(url)
    # the same label, saved again and again: still whole and unchanged
    assert np.array_equal(np.asanyarray(nib.load(label_path).dataobj), label_before)


def admission(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=30).json()["infer_admission"]


def test_overload_is_refused_at_once_and_the_server_recovers(site):
    """More concurrent infers than admitted: each gets 200 or 503 with Retry-After; /info answers meanwhile."""
    url, clients = site["server"].url, MAX_RUNNING + MAX_QUEUED + 5
    start, answers, seen_busy = threading.Barrier(clients), [], []

    def one_infer():
        start.wait()
        answers.append(requests.post(f"{url}/infer/spine", params={"image": "scan_b", "output": "json"}, timeout=300))

    threads = [threading.Thread(target=one_infer) for _ in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        state = admission(url)  # answered while infers run: they no longer hold the event loop
        if state["running"] or state["admitted"]:
            seen_busy.append(state)
        time.sleep(0.2)
    statuses = sorted(r.status_code for r in answers)
    assert len(answers) == clients and set(statuses) <= {200, 503}, statuses
    assert 1 <= statuses.count(200) and statuses.count(503) >= 1, statuses
    for r in answers:
        if r.status_code == 503:
            assert "max_concurrent_infers" in r.json()["detail"], r.text
            assert int(r.headers["Retry-After"]) >= 1
        else:
            assert "model_version" in r.json()
    assert seen_busy and all(s["running"] <= MAX_RUNNING and s["admitted"] <= MAX_RUNNING + MAX_QUEUED
                             for s in seen_busy), seen_busy
    after = admission(url)
    assert after["admitted"] == 0 and after["running"] == 0 and after["refused"] >= statuses.count(503)
    r = requests.post(f"{url}/infer/spine", params={"image": "scan_b", "output": "json"}, timeout=300)
    assert r.status_code == 200, r.text[:300]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_process(server: Server):
    """The server's training subprocess (MONAI Label runs ``python -m monailabel.interfaces.utils.app -m train``)."""
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "monailabel.interfaces.utils.app" in command and "train" in command:
            return child
    return None


def wait_until(predicate, what: str, server: Server, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what} not seen after {timeout} s:\n{server.log_text()[-3000:]}")


def test_killed_training_leaves_the_serving_model_whole(site):
    """SIGKILL the training subprocess mid-run: spine.pt is the file that served when it died,
    infers and /info still work with that version, and a new training starts and finishes."""
    server, weights = site["server"], site["model_dir"] / "spine.pt"
    r = requests.post(f"{server.url}/train/spine", json={"max_epochs": 1000, "early_stop_patience": 1000}, timeout=60)
    assert r.status_code == 200, r.text
    proc = wait_until(lambda: train_process(server), "the training subprocess", server)

    def training_epochs():
        status = requests.get(f"{server.url}/train/", params={"check_if_running": "false"}, timeout=30).json()
        if status.get("status") == "SUBMITTED":  # the subprocess exists a moment before the task says so
            return False
        assert status.get("status") == "RUNNING", status  # the run must still be going when it is killed
        return any(re.search(r"Epoch\W+\d", line) for line in status.get("details", []))

    wait_until(training_epochs, "a training epoch", server)
    proc.suspend()  # frozen first: a publication in progress is either done or not, nothing moves now
    serving_sha = sha256(weights)
    serving_version = requests.get(f"{server.url}/info/", timeout=30).json()["models"]["spine"]["model_version"]
    proc.kill()
    proc.wait(60)
    status = server.wait_for_task("train")
    assert status["status"] in ("ERROR", "STOPPED"), status
    assert sha256(weights) == serving_sha
    torch.load(weights, map_location="cpu", weights_only=True)  # whole: a state dict, not a torn file
    assert not [p for p in site["model_dir"].glob("*.pt") if p.name != "spine.pt" and "partial" in p.name]
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["spine"]["trained"] is True and info["models"]["spine"]["model_version"] == serving_version
    r = requests.post(f"{server.url}/infer/spine", params={"image": "scan_b", "output": "json"}, timeout=300)
    assert r.status_code == 200 and r.json()["model_version"] == serving_version, r.text[:300]
    # the next training is not blocked by the dead one
    r = requests.post(f"{server.url}/train/spine", json={}, timeout=60)
    assert r.status_code == 200, r.text
    status = server.wait_for_task("train")
    assert status["status"] == "DONE", "\n".join(status.get("details", []))
    assert alive(server.url)


# --- 5. restart ---------------------------------------------------------------------------


def listing(url: str) -> dict:
    objects = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    return {image_id: sorted(obj["labels"]) for image_id, obj in objects.items()}


def test_restart_lists_the_same_images_and_labels(site):
    server, studies = site["server"], site["studies"]
    before, files_before = listing(server.url), snapshot(studies)
    assert set(before) >= {"scan_a", "scan_b", "scan_c"} and before["scan_a"] == ["final"]
    server.stop()
    site["server"] = Server(studies, site["model_dir"], workdir=site["root"], conf=SITE_CONF)
    assert listing(site["server"].url) == before
    after = snapshot(studies)
    assert {k: v for k, v in after.items() if k != "datastore_v2.json"} == \
           {k: v for k, v in files_before.items() if k != "datastore_v2.json"}
    json.loads((studies / "datastore_v2.json").read_text())  # complete, parseable
