"""A PACS for the spine app: a loopback Orthanc, and MONAI Label's DICOMweb datastore made to fit.

Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``) runs as a plain process with
its own configuration and storage in one folder::

    python -m lib.pacs install                      # apt-get installs Orthanc if it is missing
    python -m lib.pacs start DIR [--port 8042] [--user U --password P]
    python -m lib.pacs upload DICOM_DIR --url http://127.0.0.1:8042 [--user U --password P]
    python -m lib.pacs stop DIR

It answers HTTP (REST and DICOMweb under ``/dicom-web``) on ``--port`` for loopback
clients only (``RemoteAccessAllowed`` false), with HTTP basic authentication; its DICOM
port is off unless ``--dicom-port`` is given.

The server's side of a PACS (``--studies http://127.0.0.1:8042/dicom-web``) is
:mod:`lib.server.dicomweb`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import requests

logger = logging.getLogger(__name__)

ORTHANC_PACKAGES = ("orthanc", "orthanc-dicomweb")
DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
DEFAULT_PORT = 8042
DEFAULT_USER, DEFAULT_PASSWORD = "spine", "spine"


# --- Orthanc: installing, starting, stopping --------------------------------------------
def orthanc_binary() -> Optional[str]:
    return shutil.which("Orthanc") or (os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None


def dicomweb_plugin() -> Optional[str]:
    for path in DICOMWEB_PLUGIN_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def install_orthanc() -> str:
    """apt-get install Orthanc and its DICOMweb plugin unless both are there; returns the binary.

    Needs root (or password-less sudo) and the Debian/Ubuntu archive. Raises
    ``RuntimeError`` saying why when it cannot install.
    """
    if orthanc_binary() and dicomweb_plugin():
        return orthanc_binary()
    if not shutil.which("apt-get"):
        raise RuntimeError("Orthanc is not installed and apt-get is not available: install "
                           f"{' and '.join(ORTHANC_PACKAGES)} by hand")
    prefix: List[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise RuntimeError("Orthanc is not installed, and installing it needs root (no sudo found)")
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                *ORTHANC_PACKAGES]):
        result = subprocess.run(prefix + args, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    if not (orthanc_binary() and dicomweb_plugin()):
        raise RuntimeError(f"{' and '.join(ORTHANC_PACKAGES)} installed, but the Orthanc binary or "
                           f"the DICOMweb plugin was not found ({DICOMWEB_PLUGIN_CANDIDATES})")
    return orthanc_binary()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_config(folder: str, port: int, user: str, password: str, dicom_port: Optional[int] = None,
                   name: str = "SPINE") -> Dict[str, Any]:
    storage = os.path.join(os.path.abspath(folder), "storage")
    return {
        "Name": name,
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpServerEnabled": True,
        "HttpPort": int(port),
        "RemoteAccessAllowed": False,  # only loopback clients
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "DicomServerEnabled": dicom_port is not None,
        "DicomPort": int(dicom_port or 0) or 4242,
        "DicomAet": name,
        "Plugins": [dicomweb_plugin() or DICOMWEB_PLUGIN_CANDIDATES[0]],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Host": f"127.0.0.1:{port}", "Ssl": False, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
        "StableAge": 5,
        "HttpThreadsCount": 8,
        "ConcurrentJobs": 1,
        "StorageCompression": False,
    }


def _pid_file(folder: str) -> str:
    return os.path.join(folder, "orthanc.pid")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def start_orthanc(folder: str, port: int = DEFAULT_PORT, user: str = DEFAULT_USER, password: str = DEFAULT_PASSWORD,
                  dicom_port: Optional[int] = None, timeout: float = 60) -> str:
    """Start Orthanc with configuration, storage, log and pid file in ``folder``; returns its URL.

    Returns once ``/system`` answers. Raises ``RuntimeError`` with the log's end when it
    exits or does not answer within ``timeout`` seconds.
    """
    binary = orthanc_binary()
    if not binary or not dicomweb_plugin():
        raise RuntimeError("Orthanc or its DICOMweb plugin is not installed: run `python -m lib.pacs install`")
    folder = os.path.abspath(folder)
    os.makedirs(os.path.join(folder, "storage"), exist_ok=True)
    if os.path.exists(_pid_file(folder)):
        old = int(open(_pid_file(folder)).read().strip() or 0)
        if old and _alive(old):
            raise RuntimeError(f"an Orthanc (pid {old}) already runs from {folder}: stop it first")
    config_path = os.path.join(folder, "orthanc.json")
    with open(config_path, "w") as f:
        json.dump(orthanc_config(folder, port, user, password, dicom_port), f, indent=2)
    os.chmod(config_path, 0o600)  # it holds the password
    log_path = os.path.join(folder, "orthanc.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([binary, config_path], cwd=folder, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    with open(_pid_file(folder), "w") as f:
        f.write(str(proc.pid))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            if requests.get(f"{url}/system", auth=(user, password), timeout=2).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_orthanc(folder)
    raise RuntimeError(f"Orthanc did not answer on {url} within {timeout} s:\n{_tail(log_path)}")


def stop_orthanc(folder: str, timeout: float = 30) -> bool:
    """Stop the Orthanc started from ``folder`` (by its pid file); False if none ran."""
    pid_path = _pid_file(os.path.abspath(folder))
    if not os.path.exists(pid_path):
        return False
    pid = int(open(pid_path).read().strip() or 0)
    os.unlink(pid_path)
    if not pid or not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child: poll instead
            if not _alive(pid):
                return True
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return True


def _tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


# --- DICOMweb clients ----------------------------------------------------------------------
def dicomweb_client(url: str, user: Optional[str] = None, password: Optional[str] = None):
    """A dicomweb-client for ``url`` (the ``.../dicom-web`` root), with basic auth when given."""
    from dicomweb_client.api import DICOMwebClient

    session = None
    if user:
        session = requests.Session()
        session.auth = (user, password or "")
    return DICOMwebClient(url=url.rstrip("/"), session=session)


def upload_series(paths: List[str], url: str, user: Optional[str] = None, password: Optional[str] = None) -> List[str]:
    """STOW-RS ``paths`` (DICOM files) to ``url`` (``.../dicom-web``); returns the series UIDs stored."""
    import pydicom

    client = dicomweb_client(url, user, password)
    datasets = [pydicom.dcmread(p) for p in paths]
    for start in range(0, len(datasets), 50):
        client.store_instances(datasets[start:start + 50])
    return sorted({str(ds.SeriesInstanceUID) for ds in datasets})


# --- command line -----------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.pacs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="apt-get install orthanc and orthanc-dicomweb when missing")
    start = sub.add_parser("start", help="start Orthanc from DIR (config, storage, log, pid file)")
    start.add_argument("dir")
    start.add_argument("--port", type=int, default=DEFAULT_PORT)
    start.add_argument("--dicom-port", type=int, default=None, help="DICOM port (default: off)")
    stop = sub.add_parser("stop", help="stop the Orthanc started from DIR")
    stop.add_argument("dir")
    upload = sub.add_parser("upload", help="STOW-RS a folder of DICOM files")
    upload.add_argument("dicom_dir")
    upload.add_argument("--url", required=True, help="Orthanc URL, e.g. http://127.0.0.1:8042 (or its /dicom-web)")
    for p in (start, upload):
        p.add_argument("--user", default=os.environ.get("ORTHANC_USER", DEFAULT_USER))
        p.add_argument("--password", default=os.environ.get("ORTHANC_PASSWORD", DEFAULT_PASSWORD))
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(f"Orthanc: {install_orthanc()}, DICOMweb plugin: {dicomweb_plugin()}")
        elif args.command == "start":
            url = start_orthanc(args.dir, args.port, args.user, args.password, args.dicom_port)
            print(f"Orthanc answers on {url} (DICOMweb: {url}/dicom-web); log {os.path.join(args.dir, 'orthanc.log')}")
        elif args.command == "stop":
            print("stopped" if stop_orthanc(args.dir) else f"no Orthanc was running from {args.dir}")
        elif args.command == "upload":
            paths = [os.path.join(r, f) for r, _, fs in os.walk(args.dicom_dir) for f in sorted(fs)]
            url = args.url.rstrip("/")
            url = url if url.endswith("/dicom-web") else url + "/dicom-web"
            series = upload_series(paths, url, args.user, args.password)
            print(f"{len(paths)} files stored; series {', '.join(series)}")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
