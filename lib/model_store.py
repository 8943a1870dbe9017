"""Where the model's weights live and how a version is named.

Layout of ``model_dir`` (default: ``model/`` at the repository root, ``--conf model_dir``):
- ``spine.pt``      the serving weights (state dict); absent = untrained (bootstrap);
- ``runs/``         training runs: checkpoints, TensorBoard events (not versioned in git);
- ``train_stats.json`` progress of the last training, shown by Slicer.
"""

from __future__ import annotations

import hashlib
import os
import time
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "model"
MODEL_NAME = "spine"


def model_dir_from_conf(conf: dict | None) -> str:
    return os.path.abspath(os.path.expanduser((conf or {}).get("model_dir") or str(DEFAULT_MODEL_DIR)))


def weights_path(model_dir: str) -> str:
    return os.path.join(model_dir, f"{MODEL_NAME}.pt")


def runs_dir(model_dir: str) -> str:
    return os.path.join(model_dir, "runs")


def model_version(path: str) -> str:
    """``<UTC time of the weights>-<first 8 hex of their sha256>``: stable, readable, unique."""
    stat = os.stat(path)
    return _version(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _version(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(mtime_ns / 1e9))
    return f"{stamp}-{digest.hexdigest()[:8]}"
