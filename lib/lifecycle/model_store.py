"""Where the model's weights live and how a version is named.

Layout of ``model_dir`` (default: ``model/`` at the repository root, ``--conf model_dir``):
- ``spine.pt``      the serving weights (state dict); absent = untrained (bootstrap);
- ``spine.json``    the serving record: which version serves (with its sha256) and its
  validation Dice on the current validation images (:mod:`lib.lifecycle.versions`);
- ``versions/``     every trained candidate, promoted or not: ``<version>/spine.pt`` and
  ``<version>/metrics.json``, plus ``history.json`` (promotions, rejections, rollbacks);
- ``split.json``    the persisted train/validation/test split (:mod:`lib.lifecycle.splits`);
- ``autotrain.json`` the automatic-training counters (:mod:`lib.lifecycle.autotrain`);
- ``runs/``         training runs: checkpoints, TensorBoard events (not versioned in git);
- ``train_stats.json`` progress of the last training, shown by Slicer.

A version id is ``<UTC time>-<first 8 hex of the weights' sha256>``. The id belongs to
the weights' content, not to a file: a copy of a version's weights (a promotion, a
rollback) is named by that version's id, whatever its modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "model"
MODEL_NAME = "spine"
VERSION_WEIGHTS = f"{MODEL_NAME}.pt"  # in ``versions/<version>/``
VERSION_METRICS = "metrics.json"  # in ``versions/<version>/``


def model_dir_from_conf(conf: dict | None) -> str:
    return os.path.abspath(os.path.expanduser((conf or {}).get("model_dir") or str(DEFAULT_MODEL_DIR)))


def weights_path(model_dir: str) -> str:
    return os.path.join(model_dir, f"{MODEL_NAME}.pt")


def runs_dir(model_dir: str) -> str:
    return os.path.join(model_dir, "runs")


def versions_dir(model_dir: str) -> str:
    return os.path.join(model_dir, "versions")


def record_path(weights: str) -> str:
    """The record next to a weights file (``spine.pt`` -> ``spine.json``)."""
    return os.path.splitext(weights)[0] + ".json"


def version_id(sha256: str, when: float | None = None) -> str:
    """``<UTC time>-<first 8 hex of the sha256>`` (``when`` in seconds since the epoch; default now)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if when is None else when))
    return f"{stamp}-{sha256[:8]}"


def model_version(path: str) -> str:
    """The version id of the weights at ``path``.

    The id a stored version was given (by the record next to the file, else by the
    version folder with the same content); for weights that were never registered,
    ``<UTC time of the file>-<first 8 hex of its sha256>``.
    """
    stat = os.stat(path)
    sha = file_sha256(path)
    record = record_path(path)
    try:
        with open(record) as f:
            known = json.load(f)
        if known.get("sha256") == sha and known.get("version"):
            return str(known["version"])
    except (OSError, ValueError, AttributeError):
        pass
    stored = stored_version(os.path.dirname(path), sha)
    return stored or version_id(sha, stat.st_mtime_ns / 1e9)


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, cached while its modification time and size stay the same."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stored_version(model_dir: str, sha: str) -> str | None:
    """Id of the stored version (``model_dir/versions/``) whose weights have this sha256."""
    folder = versions_dir(model_dir)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(f"-{sha[:8]}"))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(folder, name, VERSION_METRICS)) as f:
                if json.load(f).get("sha256") == sha:
                    return name
        except (OSError, ValueError, AttributeError):
            continue
    return None


def recorded_plan(weights: str) -> dict:
    """The plan recorded with ``weights``: in the record next to them (``spine.json``) when it
    describes these weights, else in the metrics of the stored version with the same content;
    ``{}`` when none is recorded."""
    try:
        sha = file_sha256(weights)
    except OSError:
        return {}
    candidates = [record_path(weights), os.path.join(os.path.dirname(weights), VERSION_METRICS)]
    stored = stored_version(os.path.dirname(weights), sha)
    if stored:
        candidates.append(os.path.join(versions_dir(os.path.dirname(weights)), stored, VERSION_METRICS))
    for path in candidates:
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("sha256") == sha and isinstance(record.get("plan"), dict):
            return record["plan"]
    return {}
