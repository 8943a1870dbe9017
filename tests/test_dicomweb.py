"""The spine app against a real PACS: Orthanc on loopback, MONAI Label with ``--studies .../dicom-web``.

One Orthanc (its own folder, port and password) holds an MR series and a CT series made
from a phantom; one real server, tiny random-init weights, goes through: the series is
listed (MR only), inferred on, a ``final`` label is saved and arrives in Orthanc as DICOM
SEG (our names and colours, referencing the series, written without dcmqi); after a
restart on a fresh cache the series counts as labelled and the training datalist reads
the label back from the SEG with our values; OHIF, served by the server, shows the study
(MR and SEG) in headless Chromium, and its MONAI Label panel, driven over the DevTools
protocol (``tests/cdp.py``), runs the auto-segmentation and shows our structures. The tests
run in file order.

Orthanc comes from the Debian packages ``orthanc`` and ``orthanc-dicomweb``
(:func:`lib.pacs.install_orthanc` apt-installs them when missing); the tests skip only
when that is impossible here.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from conftest import Server, free_port, missing_dependency
from lib import pacs
from lib.pipeline.labels import COLORS, NAMES

ORTHANC_USER = "annotator"


def _install_or_skip():
    try:
        pacs.install_orthanc()
    except RuntimeError as e:
        missing_dependency(f"Orthanc cannot be installed here: {e}")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    _install_or_skip()
    folder = tmp_path_factory.mktemp("orthanc")
    password = secrets.token_hex(8)
    port = free_port()
    url = pacs.start_orthanc(str(folder), port=port, user=ORTHANC_USER, password=password)
    yield {"url": url, "dicomweb": f"{url}/dicom-web", "auth": (ORTHANC_USER, password), "folder": folder}
    pacs.stop_orthanc(str(folder))


def phantom_series(out_dir: Path, seed: int, modality: str = "MR"):
    """A small phantom written as a DICOM series; returns (series files, image array, label array, affine)."""
    from lib.phantom import make_phantom
    from lib.pipeline.dicom import write_dicom_series

    image, label, affine = make_phantom(seed, shape=(24, 48, 48), spacing=(4.0, 4.0, 4.0), orientation="LPS")
    paths = write_dicom_series(image, affine, str(out_dir), patient_id=f"PHANTOM{seed}")
    if modality != "MR":
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.Modality = modality
            ds.save_as(p)
    return paths, image, label.astype(np.uint8), affine


def server_env(orthanc, cache: Path) -> dict:
    user, password = orthanc["auth"]
    return {"MONAI_LABEL_DICOMWEB_USERNAME": user, "MONAI_LABEL_DICOMWEB_PASSWORD": password,
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache), "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}


def start_server(site, cache: Path, conf: dict | None = None) -> Server:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server_env(site["orthanc"], cache).items():
            mp.setenv(key, value)
        return Server(site["orthanc"]["dicomweb"] + "/", site["model_dir"], workdir=site["root"],
                      conf={"auto_train": "false", **(conf or {})})


@pytest.fixture(scope="module")
def site(orthanc, tmp_path_factory):
    import torch

    from lib.pipeline.networks import build_network
    from lib.pipeline.plans import SpinePlan

    root = tmp_path_factory.mktemp("pacs-site")
    mr_paths, image, label, affine = phantom_series(root / "mr", seed=3)
    ct_paths, *_ = phantom_series(root / "ct", seed=4, modality="CT")
    mr_series = pacs.upload_series(mr_paths, orthanc["dicomweb"], *orthanc["auth"])
    ct_series = pacs.upload_series(ct_paths, orthanc["dicomweb"], *orthanc["auth"])
    model_dir = root / "model"
    model_dir.mkdir()
    torch.manual_seed(0)
    torch.save(build_network(SpinePlan.from_conf({"preset": "tiny"})).state_dict(), model_dir / "spine.pt")
    state = {"orthanc": orthanc, "root": root, "model_dir": model_dir, "mr": mr_series[0], "ct": ct_series[0],
             "image": image, "label": label, "affine": affine}
    state["server"] = start_server(state, root / "cache-1")
    yield state
    state["server"].stop()


def qido(orthanc, **filters):
    r = requests.get(f"{orthanc['dicomweb']}/series", params=filters, auth=orthanc["auth"], timeout=30)
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 and r.text.strip() else []


def non_loopback_address():
    """This machine's address on a network interface, or None (no network here)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


# --- 1. Orthanc --------------------------------------------------------------------------


def test_orthanc_answers_on_loopback_with_credentials_only(orthanc):
    assert orthanc["url"].startswith("http://127.0.0.1:")
    assert requests.get(f"{orthanc['url']}/system", timeout=10).status_code == 401
    assert requests.get(f"{orthanc['url']}/system", auth=(ORTHANC_USER, "wrong"), timeout=10).status_code == 401
    system = requests.get(f"{orthanc['url']}/system", auth=orthanc["auth"], timeout=10).json()
    assert system["Name"] == "SPINE"
    plugins = requests.get(f"{orthanc['url']}/plugins", auth=orthanc["auth"], timeout=10).json()
    assert "dicom-web" in plugins
    host_address = non_loopback_address()
    if host_address:  # the port is open on every interface (no bind option), but only loopback is served
        r = requests.get(orthanc["url"].replace("127.0.0.1", host_address) + "/system", auth=orthanc["auth"], timeout=10)
        assert r.status_code in (401, 403)
    config = json.loads((orthanc["folder"] / "orthanc.json").read_text())
    assert config["RemoteAccessAllowed"] is False and config["DicomServerEnabled"] is False
    assert config["StorageDirectory"].startswith(str(orthanc["folder"]))
    assert (orthanc["folder"] / "orthanc.json").stat().st_mode & 0o077 == 0  # holds the password


def test_stop_and_start_again_keeps_the_storage(orthanc, tmp_path):
    folder, port = tmp_path / "second", free_port()
    url = pacs.start_orthanc(str(folder), port=port, user="u", password="p")
    paths, *_ = phantom_series(tmp_path / "series", seed=7)
    pacs.upload_series(paths[:2], f"{url}/dicom-web", "u", "p")
    with pytest.raises(RuntimeError, match="already runs"):
        pacs.start_orthanc(str(folder), port=free_port(), user="u", password="p")
    assert pacs.stop_orthanc(str(folder)) is True
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/system", auth=("u", "p"), timeout=5)
    url = pacs.start_orthanc(str(folder), port=port, user="u", password="p")
    try:
        assert len(requests.get(f"{url}/instances", auth=("u", "p"), timeout=10).json()) == 2
    finally:
        pacs.stop_orthanc(str(folder))


# --- 2. the server on the PACS -------------------------------------------------------------


def test_server_lists_the_mr_series_only(site):
    url = site["server"].url
    stats = requests.get(f"{url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert stats["total"] == 1 and stats["completed"] == 0  # the CT series is not listed
    r = requests.post(f"{url}/activelearning/first", json={}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == site["mr"]
    assert "itkimage2segimage" not in site["server"].log_text()  # no dcmqi download attempted


def test_infer_on_the_pacs_series(site, tmp_path):
    from lib.pipeline.io import read_volume

    r = requests.post(f"{site['server'].url}/infer/spine", params={"image": site["mr"], "output": "json"},
                      json={}, timeout=600)
    assert r.status_code == 200, r.text[-2000:]
    assert "model_version" in r.json()
    r = requests.post(f"{site['server'].url}/infer/spine", params={"image": site["mr"], "output": "image"},
                      json={}, timeout=600)
    assert r.status_code == 200, r.text[-2000:]
    (tmp_path / "result.nii.gz").write_bytes(r.content)
    label, affine = read_volume(tmp_path / "result.nii.gz")
    assert label.shape == site["label"].shape  # on the series' grid
    assert np.allclose(affine, site["affine"], atol=1e-3)
    assert set(np.unique(label).astype(int)) <= set(NAMES)


def put_label(url, image_id, path: Path, tag="final", label_info=None):
    params = {"label_info": label_info} if label_info is not None else {}
    with open(path, "rb") as f:
        return requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": tag},
                            data={"params": json.dumps(params)}, files={"label": (path.name, f)}, timeout=300)


def test_a_label_on_another_grid_is_refused_and_nothing_is_stored(site, tmp_path):
    path = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(site["label"][:, :, :20], site["affine"]), path)
    r = put_label(site["server"].url, site["mr"], path)
    assert r.status_code == 422, r.text
    assert qido(site["orthanc"], Modality="SEG") == []


def test_final_label_is_stored_in_the_pacs_as_dicom_seg(site, tmp_path):
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(site["label"], site["affine"]), path)
    r = put_label(site["server"].url, site["mr"], path)
    assert r.status_code == 200, r.text[-2000:]
    segs = qido(site["orthanc"], Modality="SEG")
    assert len(segs) == 1
    seg_meta = pydicom.Dataset.from_json(segs[0])
    study, series = str(seg_meta.StudyInstanceUID), str(seg_meta.SeriesInstanceUID)
    r = requests.get(f"{site['orthanc']['dicomweb']}/studies/{study}/series/{series}/metadata",
                     auth=site["orthanc"]["auth"], timeout=30)
    meta = pydicom.Dataset.from_json(r.json()[0])
    assert meta.Modality == "SEG"
    assert meta.ReferencedSeriesSequence[0].SeriesInstanceUID == site["mr"]
    mr = pydicom.Dataset.from_json(qido(site["orthanc"], SeriesInstanceUID=site["mr"])[0])
    assert study == str(mr.StudyInstanceUID)  # in the image's study
    from pydicom_seg.template import rgb_to_cielab

    segments = {int(s.SegmentNumber): s for s in meta.SegmentSequence}
    present = sorted(int(v) for v in np.unique(site["label"]) if v)
    assert sorted(segments) == present
    for value, segment in segments.items():
        assert segment.SegmentLabel == NAMES[value]
        assert list(segment.RecommendedDisplayCIELabValue) == rgb_to_cielab(list(COLORS[NAMES[value]]))
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"


def test_after_a_restart_the_series_counts_as_labelled(site):
    site["server"].stop()
    # nothing cached; the filter as a --conf setting (PatientID narrows it to the one MR study)
    site["server"] = start_server(site, site["root"] / f"cache-{uuid.uuid4().hex[:6]}",
                                  {"dicomweb_search_filter": json.dumps({"Modality": "MR", "PatientID": "PHANTOM3"})})
    stats = requests.get(f"{site['server'].url}/datastore/", params={"output": "stats"}, timeout=120).json()
    assert stats["total"] == 1 and stats["completed"] == 1
    r = requests.get(f"{site['server'].url}/datastore/", params={"output": "train"}, timeout=300)
    assert r.status_code == 200, r.text
    assert len(r.json()) == 1


def test_training_datalist_reads_the_label_back_from_the_seg(site, tmp_path):
    from lib.pipeline.io import read_volume
    from lib.server.dicomweb import init_dicomweb_datastore

    with pytest.MonkeyPatch.context() as mp:
        for key, value in server_env(site["orthanc"], tmp_path / "cache").items():
            mp.setenv(key, value)
        from monailabel.config import settings

        for key in ("MONAI_LABEL_DICOMWEB_USERNAME", "MONAI_LABEL_DICOMWEB_PASSWORD", "MONAI_LABEL_DICOMWEB_CACHE_PATH"):
            mp.setattr(settings, key, os.environ[key])
        store = init_dicomweb_datastore(site["orthanc"]["dicomweb"])
        assert store._search_filter == {"Modality": "MR"}
        datalist = store.datalist()
    assert len(datalist) == 1
    label, label_affine = read_volume(datalist[0]["label"])
    image, image_affine = read_volume(datalist[0]["image"])
    assert label.shape == image.shape == site["label"].shape
    assert np.allclose(label_affine, image_affine, atol=1e-3)
    assert np.allclose(image_affine, site["affine"], atol=1e-3)
    assert np.array_equal(label.astype(np.uint8), site["label"])


def test_search_filter_default_and_override(monkeypatch):
    from monailabel.config import settings

    from lib.server.dicomweb import search_filter

    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_SEARCH_FILTER", {"Modality": "CT"})  # MONAI Label's default
    assert search_filter() == {"Modality": "MR"}
    assert search_filter({"dicomweb_search_filter": '{"Modality": "CT"}'}) == {"Modality": "CT"}
    monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_SEARCH_FILTER", {"Modality": "MR", "SeriesDescription": "T2*"})
    assert search_filter() == {"Modality": "MR", "SeriesDescription": "T2*"}
    with pytest.raises(ValueError, match="JSON object"):
        search_filter({"dicomweb_search_filter": "[1]"})


# --- 3. OHIF, served by the server, in a headless browser ---------------------------------------


def chromium_or_skip() -> str:
    """Debian's ``chromium`` (apt-installed when missing, as Orthanc is), or skip saying why."""
    import shutil
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        return binary
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            if subprocess.run(args, env=env, capture_output=True).returncode != 0:
                break
        binary = shutil.which("chromium")
    if not binary:
        missing_dependency("no Chromium here and it cannot be apt-installed (needs root and the Debian archive)")
    return binary


def rendered_text(url: str, profile: Path, expected: list[str]) -> str:
    """The page's text after its scripts ran (headless Chromium ``--dump-dom``), retried with
    more virtual time until every ``expected`` piece shows (or three tries)."""
    import re
    import subprocess

    chromium = chromium_or_skip()
    text = ""
    for attempt, budget in enumerate((30000, 60000, 120000)):
        args = [chromium, "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", f"--user-data-dir={profile}-{attempt}", "--window-size=1600,1000",
                f"--virtual-time-budget={budget}", "--dump-dom", url]
        dom = subprocess.run(args, capture_output=True, text=True, timeout=300).stdout
        dom = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
        text = re.sub(r"\s*\|\s*(\|\s*)*", " | ", re.sub(r"<[^>]+>", " | ", dom))
        if all(piece in text for piece in expected):
            break
    return text


def test_ohif_lists_the_study_and_shows_the_series_and_the_seg(site, tmp_path):
    url, mr = site["server"].url, pydicom.Dataset.from_json(qido(site["orthanc"], SeriesInstanceUID=site["mr"])[0])
    study_list = rendered_text(f"{url}/ohif/", tmp_path / "chrome", ["PHANTOM3", "MR\\SEG"])
    row = study_list[study_list.index("PHANTOM3"):][:200]  # the study row, through the server's DICOMweb proxy
    assert "MR\\SEG" in row, study_list[-3000:]
    n = site["image"].shape[2]  # slices: written along the array's third axis
    assert f"| {n + 1} |" in row  # the series' instances and the SEG
    viewer = rendered_text(f"{url}/ohif/viewer?StudyInstanceUIDs={mr.StudyInstanceUID}", tmp_path / "chrome-viewer",
                           ["Spine segmentation", "T2 SAG", f"/{n})"])
    assert "Spine segmentation" in viewer, viewer[-3000:]  # our SEG series in the study browser
    assert f"/{n})" in viewer  # the MR series is displayed, slice i of n


def test_ohif_opens_the_monai_label_mode_on_the_series(site, tmp_path):
    url, mr = site["server"].url, pydicom.Dataset.from_json(qido(site["orthanc"], SeriesInstanceUID=site["mr"])[0])
    n = site["image"].shape[2]
    page = rendered_text(f"{url}/ohif/monai-label?StudyInstanceUIDs={mr.StudyInstanceUID}", tmp_path / "chrome-mode",
                         ["MONAI Label", "T2 SAG", f"/{n})"])
    assert "MONAI Label" in page and "Server:" in page, page[-3000:]  # the mode's panel (not driven further)
    assert f"/{n})" in page  # the MR series in the viewports


# --- 4. the MONAI Label panel in OHIF drives the server's auto-segmentation ---------------------------


SEGMENTS_JS = """(() => {
    const service = window.services.segmentationService;
    const seg = service.getSegmentations().find(s => s.segmentationId === '1');
    const volume = service.getLabelmapVolume('1');
    if (!seg || !volume) return null;
    const segments = seg.segments || (seg.config && seg.config.segments) || {};
    const names = {};
    for (const [index, segment] of Object.entries(segments)) if (segment) names[index] = segment.label;
    const data = volume.voxelManager.getCompleteScalarDataArray();
    const counts = {};
    for (let i = 0; i < data.length; i++) if (data[i]) counts[data[i]] = (counts[data[i]] || 0) + 1;
    const byName = {};
    for (const [index, n] of Object.entries(counts)) byName[names[index] || ('#' + index)] = n;
    return {names: Object.values(names), voxels: data.length, counts: byName};
})()"""

# strongly coloured pixels in the viewports' canvases: the MR image is grey, the overlay is not
COLOURED_PIXELS_JS = """[...document.querySelectorAll('canvas.cornerstone-canvas')].map(c => {
    const ctx = c.getContext('2d');
    if (!ctx || !c.width || !c.height) return 0;
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let coloured = 0;
    for (let i = 0; i < d.length; i += 4)
        if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 40) coloured++;
    return coloured;
}).reduce((a, b) => a + b, 0)"""

# remembers every notification the page showed (they disappear after a few seconds)
NOTIFICATIONS_JS = """(() => {
    window.__seen = [];
    const watch = ['Running Segmentation - Successful', 'Failed to Run Segmentation', 'Something went wrong'];
    new MutationObserver(() => {
        const text = document.body.innerText;
        for (const m of watch) if (text.includes(m) && !window.__seen.includes(m)) window.__seen.push(m);
    }).observe(document.body, {childList: true, subtree: true, characterData: true});
    return true;
})()"""


def test_ohif_monai_label_panel_runs_the_auto_segmentation(site, tmp_path):
    """In the MONAI Label mode: connect the panel to our server, press Run under
    Auto-Segmentation (model ``spine``), and the page shows the result: the success
    notification, our structures as OHIF's segments with the same voxel counts per structure
    as the server's own ``/infer/spine`` result, and the overlay drawn in the viewports."""
    from cdp import Browser

    from lib.pipeline.io import read_volume

    url, mr = site["server"].url, pydicom.Dataset.from_json(qido(site["orthanc"], SeriesInstanceUID=site["mr"])[0])
    n = site["image"].shape[2]
    artefacts = [tmp_path / "ohif_autoseg.png", Path(__file__).resolve().parents[1] / "work" / "artifacts" / "ohif_autoseg.png"]
    with Browser(chromium_or_skip(), tmp_path / "chrome-cdp") as page:
        page.navigate(f"{url}/ohif/monai-label?StudyInstanceUIDs={mr.StudyInstanceUID}")
        page.wait_for(f"document.body.innerText.includes('Server:') && document.body.innerText.includes('/{n})')",
                      timeout=300, what="the MONAI Label panel and the series in the viewports")
        if page.evaluate("[...document.querySelectorAll('button')].some(b => b.innerText.includes('Confirm and Hide'))"):
            page.click("button", "Confirm and Hide")  # OHIF's "investigational use" banner
        # the panel's server field (it defaults to port 8000 of the page's host), then its connect button
        page.evaluate("(() => { const i = document.getElementById('monailabelServerURL'); i.focus(); i.select(); })()")
        page.call("Input.insertText", text=f"{url}/")
        page.click("table.settingsTable button.actionButton")
        deadline = time.time() + 120
        while "Auto-Segmentation" not in page.text() and time.time() < deadline:
            broken = [m for m in page.console if "all_labels.push is not a function" in m]
            if broken:  # the panel's error boundary replaced it
                page.screenshot(artefacts[0])
                pytest.fail("the OHIF MONAI Label panel cannot connect: it expects /info's top-level 'labels' to be "
                            "a list (apps/spine/main.py): " + broken[0][:300])
            time.sleep(1)
        panel = page.evaluate("document.querySelector('.monaiLabelPanel').innerText")
        assert "Auto-Segmentation" in panel and "spine" in panel, panel
        assert page.evaluate("[...document.querySelectorAll('.monaiLabelPanel select')].some(s => s.value === 'spine')")
        # the empty labelmap the panel creates on connecting, with one segment per structure
        before = page.wait_for(SEGMENTS_JS, timeout=120, what="the panel's (empty) segmentation")
        assert set(NAMES.values()) - {"background"} <= set(before["names"]), before
        assert before["counts"] == {}
        coloured_before = page.evaluate(COLOURED_PIXELS_JS)
        page.evaluate(NOTIFICATIONS_JS)

        page.click("button[title='Run Segmentation']", "Run")
        seen = page.wait_for("window.__seen.length ? window.__seen : null", timeout=600, what="the segmentation's outcome")
        assert seen == ["Running Segmentation - Successful"], seen
        after = page.wait_for(f"(() => {{ const s = {SEGMENTS_JS}; return s && Object.keys(s.counts).length ? s : null; }})()",
                              timeout=120, what="voxels in the segmentation")
        coloured_after = page.wait_for(f"(() => {{ const n = {COLOURED_PIXELS_JS}; return n > {coloured_before} + 1000 ? n : 0; }})()",
                                       timeout=120, what="the overlay drawn in the viewports")
        for path in artefacts:
            page.screenshot(path)
        print(f"\nscreenshot: {artefacts[0]} and {artefacts[1]}")
    assert after["voxels"] == site["image"].size
    assert set(after["counts"]) <= set(NAMES.values()) - {"background"}, after["counts"]  # our structures only
    # the same segmentation the server gives for the series (the model is deterministic)
    r = requests.post(f"{url}/infer/spine", params={"image": site["mr"], "output": "image"}, json={}, timeout=600)
    assert r.status_code == 200, r.text[-2000:]
    (tmp_path / "server.nii.gz").write_bytes(r.content)
    label, _ = read_volume(tmp_path / "server.nii.gz")
    values, counts = np.unique(label.astype(int), return_counts=True)
    assert after["counts"] == {NAMES[v]: int(c) for v, c in zip(values, counts) if v}
    assert coloured_after > coloured_before
    ohif_request = f"Infer Request: {{'model': 'spine', 'image': '{site['mr']}', 'result_extension': '.nrrd'"
    assert ohif_request in site["server"].log_text()  # the panel's request (NRRD, as the plugin asks)


def test_batch_pre_segmentation_of_the_pacs_stores_original_segs(site, tmp_path):
    """``python -m lib.segment URL``: every MR series without a SEG of the app gets an
    ``original`` SEG in the PACS; the series with the annotator's final SEG and the CT series
    are left alone; a second run skips what is done; an original SEG does not make its
    series count as labelled (training never takes a pre-segmentation for a correction)."""
    import subprocess
    import sys

    from conftest import REPO
    from lib.server.dicomweb import ORIGINAL_SEG_DESCRIPTION, init_dicomweb_datastore

    new_paths, *_ = phantom_series(tmp_path / "mr5", seed=5)
    new_series = pacs.upload_series(new_paths, site["orthanc"]["dicomweb"], *site["orthanc"]["auth"])[0]
    env = dict(os.environ, **server_env(site["orthanc"], tmp_path / "cache"))

    def segment(*extra):
        return subprocess.run([sys.executable, "-m", "lib.segment", site["orthanc"]["dicomweb"], "--output",
                               str(tmp_path / "out"), "--model", str(site["model_dir"] / "spine.pt"),
                               "--conf", "preset", "tiny", *extra], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)

    first = segment()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 of 2 series already have a SEG (final): skipped" in first.stderr  # PHANTOM3's final SEG
    originals = [s for s in qido(site["orthanc"], Modality="SEG", includefield="SeriesDescription")
                 if pydicom.Dataset.from_json(s).get("SeriesDescription") == ORIGINAL_SEG_DESCRIPTION]
    assert len(originals) == 1
    seg = pydicom.Dataset.from_json(originals[0])
    r = requests.get(f"{site['orthanc']['dicomweb']}/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}"
                     "/metadata", auth=site["orthanc"]["auth"], timeout=30)
    assert pydicom.Dataset.from_json(r.json()[0]).ReferencedSeriesSequence[0].SeriesInstanceUID == new_series

    again = segment()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 of 2 series already have a SEG (final, original): skipped" in again.stderr

    with pytest.MonkeyPatch.context() as mp:
        from monailabel.config import settings

        for key, value in server_env(site["orthanc"], tmp_path / "cache-check").items():
            mp.setattr(settings, key, value)
        store = init_dicomweb_datastore(site["orthanc"]["dicomweb"])
        assert new_series in store.list_images()
        assert new_series not in store.get_labeled_images() and site["mr"] in store.get_labeled_images()


def test_a_series_that_cannot_be_fetched_fails_alone(site, tmp_path):
    """``python -m lib.segment URL`` fetches each series when its turn comes: one the
    datastore cannot turn into a volume (instances of two sizes) is reported and the run
    ends with status 1, and the series after it still gets its SEG."""
    import subprocess
    import sys

    from conftest import REPO
    from lib.server.dicomweb import ORIGINAL_SEG_DESCRIPTION

    broken_paths, *_ = phantom_series(tmp_path / "broken", seed=6)
    for path in broken_paths[3:5]:
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Rows * 2  # pixel data of the old size: no reader makes a volume of these
        ds.save_as(path)
    good_paths, *_ = phantom_series(tmp_path / "good", seed=7)
    broken = pacs.upload_series(broken_paths, site["orthanc"]["dicomweb"], *site["orthanc"]["auth"])[0]
    good = pacs.upload_series(good_paths, site["orthanc"]["dicomweb"], *site["orthanc"]["auth"])[0]

    def originals() -> dict:
        found = {}
        for s in qido(site["orthanc"], Modality="SEG", includefield="SeriesDescription"):
            seg = pydicom.Dataset.from_json(s)
            if seg.get("SeriesDescription") == ORIGINAL_SEG_DESCRIPTION:
                r = requests.get(f"{site['orthanc']['dicomweb']}/studies/{seg.StudyInstanceUID}/series/"
                                 f"{seg.SeriesInstanceUID}/metadata", auth=site["orthanc"]["auth"], timeout=30)
                found[pydicom.Dataset.from_json(r.json()[0]).ReferencedSeriesSequence[0].SeriesInstanceUID] = seg
        return found

    assert broken not in originals() and good not in originals()
    env = dict(os.environ, **server_env(site["orthanc"], tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-m", "lib.segment", site["orthanc"]["dicomweb"], "--output",
                          str(tmp_path / "out"), "--model", str(site["model_dir"] / "spine.pt"),
                          "--conf", "preset", "tiny"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"{broken}: not fetched" in run.stderr, run.stderr[-3000:]
    stored = originals()
    assert good in stored and broken not in stored
