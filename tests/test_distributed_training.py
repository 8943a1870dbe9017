"""The server's train task on several processes (``--conf train_processes 2``): gloo on this
CPU, as NCCL would be on GPUs; against a real server over HTTP.

One run spread over two processes leaves one version, promoted once (rank 0 concludes);
a worker killed mid-run fails the run and leaves the serving model and the versions as
they were.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest
import requests

from conftest import Server, small_site
from lib.lifecycle.model_store import file_sha256
from test_server import put_label

CONF = {"auto_train": "false", "warmup_epochs": 0, "learning_rate": 0.01, "val_interval": 1,
        "train_processes": 2}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = small_site(tmp_path_factory, "distributed", 4)
    server = site["server"] = Server(site["studies"], site["model_dir"], workdir=site["root"], conf=CONF)
    for case_id in site["cases"]:
        r = put_label(server.url, case_id, site["reference"] / f"{case_id}_label.nii.gz")
        assert r.status_code == 200, r.text
    yield site
    server.stop()


def versions(site) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in (site["model_dir"] / "versions").glob("*/metrics.json")}


def spawned_workers(server: Server) -> list:
    """The live processes ``torch.multiprocessing.spawn`` started below the server (a child
    that has just ended, or a zombie not reaped yet, is none of them)."""
    workers = []
    for process in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            continue
    return workers


def test_two_processes_train_one_version(site):
    server = site["server"]
    status = server.run_task("train", "spine", {"max_epochs": 2})
    # the log tail holds what a spawned process printed before it died (gloo says why)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])[-40:]) + server.log_text()[-4000:]
    log = server.log_text()
    assert "Total proces to spawn: 2" in log and "gloo" in log
    (version, metrics), = versions(site).items()  # one version although two processes trained
    assert metrics["promoted"] is True and metrics["epochs"] == 2
    assert metrics["train_images"] + metrics["val_images"] == 4
    assert json.loads((site["model_dir"] / "spine.json").read_text())["version"] == version
    train_status = requests.get(f"{server.url}/train/", params={"check_if_running": "false"}, timeout=10).json()
    assert version in json.dumps(train_status.get("result") or train_status)
    site["v1"] = version


def test_a_killed_worker_fails_the_run_and_changes_nothing(site):
    server = site["server"]
    before = file_sha256(site["model_dir"] / "spine.pt"), sorted(versions(site))
    r = requests.post(f"{server.url}/train/spine", json={"max_epochs": 500}, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.time() + 300
    while time.time() < deadline and len(spawned_workers(server)) < 2:
        time.sleep(0.5)
    workers = spawned_workers(server)
    assert len(workers) == 2, server.log_text()[-3000:]
    time.sleep(3)  # into the epochs
    workers[-1].send_signal(signal.SIGKILL)
    status = server.wait_for_task("train", timeout=300)
    assert status["status"] != "DONE", status
    assert (file_sha256(site["model_dir"] / "spine.pt"), sorted(versions(site))) == before
    assert not spawned_workers(server)  # no process left behind
