"""Shared fixtures: real data locations, small real scans, and a real MONAI Label server.

The server is started exactly as a user starts it (``python -m monailabel.main
start_server --app apps/spine ...``) on a free loopback port, from a working directory
outside the repository, with the tiny preset so that one epoch takes seconds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def missing_dependency(message: str):
    """A test cannot run because something it needs is missing (shared data, Orthanc,
    Chromium): under ``CI=true`` that fails the run with the message; elsewhere it skips
    with the reason, listed by pytest's summary."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"missing dependency (CI=true): {message}", pytrace=False)
    pytest.skip(message)


def shared_data() -> Path:
    if not (SHARED_DATA / "manifest.json").exists():
        missing_dependency(f"development data not found at {SHARED_DATA}")
    return SHARED_DATA


def reliable_spider_ids() -> list[str]:
    from lib.evaluate import reliable_ids

    return reliable_ids(shared_data())


def small_scan(case_id: str, out_dir: Path, axcodes: str = "LPS", lr_step: int = 3, inplane_step: int = 3):
    """A real SPIDER scan made small and anisotropic, stored in ``axcodes`` orientation.

    Keeps every ``lr_step``-th sagittal slice (1 mm -> 3 mm) and every ``inplane_step``-th
    in-plane voxel. Returns ``(image_path, label_path)``; the label is the matching
    reference mask (255 -> 0) on the same grid.
    """
    data = shared_data()
    img = nib.load(data / "images" / f"{case_id}.nii.gz")
    lab = nib.load(data / "labels" / f"{case_id}.nii.gz")
    slicer = (slice(None, None, lr_step), slice(None, None, inplane_step), slice(None, None, inplane_step))
    img_small = img.slicer[slicer]
    lab_small = lab.slicer[slicer]
    start = nib.orientations.io_orientation(img_small.affine)
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    transform = nib.orientations.ornt_transform(start, target)

    def reorient(im, dtype):
        arr = nib.orientations.apply_orientation(np.asanyarray(im.dataobj), transform).astype(dtype)
        aff = im.affine @ nib.orientations.inv_ornt_aff(transform, im.shape)
        return nib.Nifti1Image(arr, aff)

    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / f"{case_id}.nii.gz"
    label_path = out_dir / f"{case_id}_label.nii.gz"
    image = reorient(img_small, np.int16)
    label_arr = np.asanyarray(lab_small.dataobj).copy()
    label_arr[label_arr == 255] = 0
    label = reorient(nib.Nifti1Image(label_arr, lab_small.affine), np.uint8)
    for im in (image, label):
        im.set_qform(im.affine, code=1)
        im.set_sform(im.affine, code=1)
    nib.save(image, image_path)
    nib.save(label, label_path)
    return image_path, label_path


def small_site(tmp_path_factory, name: str, count: int) -> dict:
    """A site folder for a real server: ``studies/`` with ``count`` small real scans,
    ``reference/`` with their scans and labels (``<id>_label.nii.gz``), an empty ``model/``."""
    root = tmp_path_factory.mktemp(name)
    studies, model_dir, reference = root / "studies", root / "model", root / "reference"
    studies.mkdir()
    cases = reliable_spider_ids()[:count]
    for case_id in cases:
        image, _ = small_scan(case_id, reference)
        (studies / image.name).write_bytes(image.read_bytes())
    return {"root": root, "studies": studies, "model_dir": model_dir, "reference": reference, "cases": cases}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``monailabel start_server`` process for the spine app."""

    def __init__(self, studies: Path, model_dir: Path, workdir: Path, conf: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.studies, self.model_dir, self.workdir = studies, model_dir, workdir
        conf = {"preset": "tiny", "model_dir": str(model_dir), **(conf or {})}
        args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "apps" / "spine")]
        args += ["--studies", str(studies), "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in conf.items():
            args += ["--conf", key, str(value)]
        self.log_path = workdir / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for_task(self, kind: str, timeout: float = 600) -> dict:
        """Wait until the last ``kind`` task (train, scoring) is no longer running; return its status."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = requests.get(f"{self.url}/{kind}/", params={"check_if_running": "false"}, timeout=10).json()
            if status and status.get("status") not in ("SUBMITTED", "RUNNING"):
                return status
            time.sleep(2)
        raise TimeoutError(f"{kind} still running after {timeout} s:\n{self.log_text()[-4000:]}")

    def run_task(self, kind: str, path: str, params: dict | None = None, timeout: float = 600) -> dict:
        """Start a train/scoring task and wait for it; one already running (429) is waited for instead."""
        r = requests.post(f"{self.url}/{kind}/{path}", json=params or {}, timeout=60)
        assert r.status_code in (200, 429), r.text
        return self.wait_for_task(kind, timeout)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def sha256(data: bytes) -> str:
    """Digest to compare file contents: a failing assert then prints two short strings, not a diff of MBs."""
    return hashlib.sha256(data).hexdigest()


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with the SHA-256 of its bytes: to prove a refused request wrote
    nothing (digests, so that a failing comparison prints short strings, not a diff of MBs)."""
    return {
        str(p.relative_to(folder)): sha256(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
