"""Model versions: every training run leaves a candidate; one version serves; admins roll back.

Each run's best checkpoint becomes a *version* in ``model_dir/versions/<version>/``:
``spine.pt`` (the weights) and ``metrics.json`` (mean and per-structure validation Dice,
the validation image ids, train/validation image counts, time, run id, whether it was
promoted and why, and any later re-measurement on a changed validation set). Nothing is
ever deleted: a rejected candidate stays listed, with its reason.

What serves is ``model_dir/spine.pt`` with its record ``spine.json``: the version id,
the weights' sha256 and the serving model's Dice on the *current* validation images.
:func:`compare` decides a promotion; :func:`serve` makes a version serve (weights copied
atomically, then the record); ``history.json`` lists promotions, rejections and rollbacks.
Writers (the train process, the server, the command line) hold ``versions/.lock``.

    python -m lib.versions list [--model-dir DIR]
    python -m lib.versions rollback VERSION [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from filelock import FileLock

from lib.pipeline.errors import Conflict, InvalidInput, PlanMismatch, SpineError
from lib.pipeline.io import atomic_copy, atomic_write_text
from lib.lifecycle.model_store import (DEFAULT_MODEL_DIR, VERSION_METRICS, VERSION_WEIGHTS, file_sha256, model_version,
                             record_path, stored_version, version_id, versions_dir, weights_path)
from lib.lifecycle.splits import read_split, split_path

logger = logging.getLogger(__name__)

VERSION_PATTERN = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")
HISTORY_FILENAME = "history.json"
#: what ``/info`` lists (the newest first); the command line lists all
INFO_VERSIONS = 10
INFO_HISTORY = 5
#: the measurement of a model on the validation images, as stored in records and metrics
MEASUREMENT_KEYS = ("val_mean_dice", "per_structure_dice", "validation_ids", "measured", "run_id")
#: the shipped starter model was measured on 6 development validation scans; a site's candidate replaces
#: it only once compared with it on this many of the site's own validation images (``--conf
#: starter_min_val_images``). On fewer the gate is a coin toss: in the annotation simulation on real
#: scans (README), a candidate fine-tuned on 4 site labels won on its 1 validation image, replaced the
#: starter and lost 8.6 Dice points on the held-out scans.
STARTER_MIN_VAL_IMAGES = 3


class UnknownVersion(SpineError):
    status = 404


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def lock(model_dir: str) -> FileLock:
    """The lock of every change to versions, the serving weights and their record."""
    os.makedirs(versions_dir(model_dir), exist_ok=True)
    return FileLock(os.path.join(versions_dir(model_dir), ".lock"))


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.error(f"{path} unreadable: {e}")
        return None


def _write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def version_dir(model_dir: str, version: str) -> str:
    """The folder of ``version``; 422 for an id that is not one (it becomes a path)."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise InvalidInput(f"{version!r} is not a version id (expected YYYYMMDD-HHMMSS-xxxxxxxx)")
    return os.path.join(versions_dir(model_dir), version)


def load_version(model_dir: str, version: str) -> Dict[str, Any]:
    """A version's ``metrics.json``; 404 when there is no such version."""
    metrics = _read_json(os.path.join(version_dir(model_dir, version), VERSION_METRICS))
    if not isinstance(metrics, dict):
        raise UnknownVersion(f"no model version {version!r} in {versions_dir(model_dir)}")
    return metrics


def list_versions(model_dir: str) -> List[Dict[str, Any]]:
    """Every stored version's metrics, oldest first."""
    folder = versions_dir(model_dir)
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if VERSION_PATTERN.fullmatch(name):
            metrics = _read_json(os.path.join(folder, name, VERSION_METRICS))
            if isinstance(metrics, dict):  # a folder without metrics is a registration cut short
                found.append(metrics)
    return sorted(found, key=lambda m: (m.get("created_ts", 0), m["version"]))


def latest_measurement(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """A version's most recent measurement: its last re-evaluation, else its own at creation."""
    evaluations = metrics.get("evaluations") or []
    source = evaluations[-1] if evaluations else metrics
    return {k: source.get(k) for k in MEASUREMENT_KEYS}


def serving_record(model_dir: str) -> Dict[str, Any]:
    """What serves now: ``spine.json`` when it describes ``spine.pt``; ``{}`` when untrained.

    Weights put in place by other means (a copied starter model, MONAI Label's model
    upload) get a record with their version and sha256 but no measurement.
    """
    weights = weights_path(model_dir)
    if not os.path.exists(weights):
        return {}
    sha = file_sha256(weights)
    record = _read_json(record_path(weights))
    if isinstance(record, dict) and record.get("sha256") == sha:
        return record
    return {"version": model_version(weights), "sha256": sha, "how": "unregistered", "val_mean_dice": None,
            "validation_ids": None}


def register(model_dir: str, weights: str, metrics: Dict[str, Any], when: Optional[float] = None,
             version: Optional[str] = None) -> Dict[str, Any]:
    """Store ``weights`` as a new version with ``metrics``; returns the stored metrics.

    ``version``: the id the weights already carry (a shipped record names it); by default
    a new one from ``when`` and the weights' sha256.

    The weights are copied first and ``metrics.json`` written last: a folder without
    metrics is a registration that was cut short, and is not listed.
    """
    when = time.time() if when is None else when
    sha = file_sha256(weights)
    known = stored_version(model_dir, sha)
    if known:  # the same weights are a version already
        return load_version(model_dir, known)
    if not (version and VERSION_PATTERN.fullmatch(version) and version.endswith(sha[:8])):
        version = version_id(sha, when)
    folder = version_dir(model_dir, version)
    os.makedirs(folder, exist_ok=True)
    atomic_copy(weights, os.path.join(folder, VERSION_WEIGHTS))
    stored = {"version": version, "sha256": sha, "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when)),
              "created_ts": when, **metrics}
    _write_json(os.path.join(folder, VERSION_METRICS), stored)
    return stored


def register_serving(model_dir: str) -> Dict[str, Any]:
    """The serving weights as a version (registered now, as ``imported``, if they are not yet)."""
    record = serving_record(model_dir)
    if not record:
        raise UnknownVersion("no model serves yet")
    weights = weights_path(model_dir)
    version = model_version(weights)
    try:
        return load_version(model_dir, version)
    except UnknownVersion:
        pass
    stat = os.stat(weights)
    plan = {"plan": record["plan"]} if isinstance(record.get("plan"), dict) else {}
    metrics = register(model_dir, weights, {"source": "imported", "promoted": True,
                                            "decision": "serving weights found in model_dir, registered as a version",
                                            **{k: record.get(k) for k in MEASUREMENT_KEYS}, **plan},
                       when=stat.st_mtime, version=None if record.get("how") == "unregistered" else version)
    if record.get("how") == "unregistered":  # the record now names the registered version
        _write_json(record_path(weights), {**record, "version": metrics["version"], "how": "imported",
                                           "since": _now_iso()})
    add_event(model_dir, "imported", metrics["version"], reason=metrics["decision"])
    return metrics


def install_starter(model_dir: str, plan: Any, enabled: bool = True) -> Optional[Dict[str, Any]]:
    """Serve the shipped starter model (``model/spine.pt``) in an empty ``model_dir``.

    A site that keeps its models elsewhere (``--conf model_dir DIR``) starts from the starter
    weights, so its first training fine-tunes them and the promotion gate measures them on
    the site's validation images. Nothing happens when ``enabled`` is false (``--conf
    starter_model false``: start from scratch), when ``model_dir`` already has weights or is
    the shipped folder itself, or when the starter was built for another plan (a test preset,
    the 3D mode). Returns the starter's version metrics when it was installed.
    """
    from lib.pipeline.networks import check_plan  # torch only when a server starts, not for `lib.lifecycle.versions list`

    starter = weights_path(str(DEFAULT_MODEL_DIR))
    weights = weights_path(model_dir)
    if (not enabled or not os.path.exists(starter) or os.path.exists(weights)
            or os.path.realpath(model_dir) == os.path.realpath(str(DEFAULT_MODEL_DIR))):
        return None
    try:
        check_plan(starter, plan)
    except PlanMismatch as e:
        logger.info(f"Starter model not installed: {e}")
        return None
    with lock(model_dir):
        if os.path.exists(weights):
            return None
        atomic_copy(record_path(starter), record_path(weights))  # the record first: it names these weights
        atomic_copy(starter, weights)
        metrics = register_serving(model_dir)
    logger.info(f"Starter model {metrics['version']} serves in {model_dir} (fine-tuned by the first training)")
    return metrics


def add_evaluation(model_dir: str, version: str, measurement: Dict[str, Any]) -> Dict[str, Any]:
    """Append a re-measurement (another validation set) to a version's metrics."""
    metrics = load_version(model_dir, version)
    metrics.setdefault("evaluations", []).append({k: measurement.get(k) for k in MEASUREMENT_KEYS})
    _write_json(os.path.join(version_dir(model_dir, version), VERSION_METRICS), metrics)
    return metrics


def remeasure_serving(model_dir: str, sha: str, measurement: Dict[str, Any]) -> bool:
    """Store a new measurement of the serving model (if the weights with ``sha`` still serve)."""
    with lock(model_dir):
        record = serving_record(model_dir)
        if record.get("sha256") != sha:
            return False  # a rollback came in between: the caller measures again
        metrics = register_serving(model_dir)
        add_evaluation(model_dir, metrics["version"], measurement)
        record = serving_record(model_dir)
        _write_json(record_path(weights_path(model_dir)),
                    {**record, **{k: measurement.get(k) for k in MEASUREMENT_KEYS}})
        return True


def starter_sha256() -> Optional[str]:
    """The sha256 of the shipped starter weights (``model/spine.json``), None without one."""
    try:
        return _read_json(record_path(weights_path(str(DEFAULT_MODEL_DIR)))).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None


def compare(candidate: Dict[str, Any], serving: Dict[str, Any], starter_sha: Optional[str] = None,
            starter_min_val_images: int = STARTER_MIN_VAL_IMAGES) -> Tuple[bool, str]:
    """Whether a candidate may replace the serving model, and why (pure).

    Both are measurements (:data:`MEASUREMENT_KEYS`); ``serving`` is ``{}`` when nothing
    serves. They must have been measured on the same validation images. When the serving
    weights are the shipped starter model (``starter_sha``), the candidate must also have been
    compared on at least ``starter_min_val_images`` of the site's validation images.
    """
    if not serving:
        return True, "first model: nothing served before"
    val_ids = candidate.get("validation_ids") or []
    if starter_sha and serving.get("sha256") == starter_sha and len(val_ids) < starter_min_val_images:
        return False, (f"the starter model keeps serving until a candidate can be compared with it on "
                       f"{starter_min_val_images} of the site's validation images ({len(val_ids)} so far)")
    if not val_ids:
        return True, "no validation images yet: nothing to compare on, the newest run serves"
    if sorted(serving.get("validation_ids") or []) != sorted(val_ids):
        raise ValueError("candidate and serving model were measured on different validation images")
    new, old = candidate.get("val_mean_dice"), serving.get("val_mean_dice")
    where = f"on the same {len(val_ids)} validation image{'s' if len(val_ids) > 1 else ''}"
    if old is None:
        return True, f"the serving model has no validation Dice {where}"
    if new is None:
        return False, f"the candidate has no validation Dice {where} (serving: {old:.4f})"
    if new >= old:
        return True, f"mean val Dice {new:.4f} >= serving {old:.4f} {where}"
    return False, f"mean val Dice {new:.4f} < serving {old:.4f} {where}"


def serve(model_dir: str, version: str, how: str, reason: str, by: str = "") -> Dict[str, Any]:
    """Make ``version`` serve: its weights replace ``spine.pt`` atomically, then the record.

    The caller holds :func:`lock`. The record carries the version's latest measurement.
    """
    metrics = load_version(model_dir, version)
    source = os.path.join(version_dir(model_dir, version), VERSION_WEIGHTS)
    if not os.path.exists(source) or file_sha256(source) != metrics.get("sha256"):
        raise Conflict(f"the weights of version {version} are missing or damaged: not served")
    previous = serving_record(model_dir).get("version")
    weights = weights_path(model_dir)
    atomic_copy(source, weights)  # infer never reads half a file
    record = {"version": version, "sha256": metrics["sha256"], "how": how, "reason": reason, "since": _now_iso(),
              **latest_measurement(metrics), **({"plan": metrics["plan"]} if metrics.get("plan") else {})}
    _write_json(record_path(weights), record)
    add_event(model_dir, how, version, previous=previous, reason=reason, by=by)
    logger.info(f"Model version {version} serves ({how}: {reason}); before: {previous}")
    return record


def rollback(model_dir: str, version: str, by: str = "") -> Dict[str, Any]:
    """Make an earlier version serve again; the history keeps every version and the rollback.

    Returns the serving record. Rolling back to the version that serves changes nothing.
    """
    with lock(model_dir):
        load_version(model_dir, version)  # 422 / 404 first
        current = serving_record(model_dir)
        if current.get("version") == version:
            return current
        if current:
            register_serving(model_dir)  # the weights rolled back from stay available
        return serve(model_dir, version, "rollback", f"rollback from {current.get('version')}", by=by)


def add_event(model_dir: str, event: str, version: str, previous: Optional[str] = None, reason: str = "",
              by: str = "") -> None:
    """Append to ``history.json`` (the caller holds :func:`lock`, or nobody else can write)."""
    path = os.path.join(versions_dir(model_dir), HISTORY_FILENAME)
    history = _read_json(path) or []
    history.append({"time": _now_iso(), "event": event, "version": version, "previous": previous,
                    "reason": reason, **({"by": by} if by else {})})
    _write_json(path, history)


def history(model_dir: str) -> List[Dict[str, Any]]:
    return _read_json(os.path.join(versions_dir(model_dir), HISTORY_FILENAME)) or []


def _short(metrics: Dict[str, Any], serving: Optional[str]) -> Dict[str, Any]:
    return {"version": metrics["version"], "created": metrics.get("created"), "source": metrics.get("source"),
            "val_mean_dice": metrics.get("val_mean_dice"), "val_images": len(metrics.get("validation_ids") or []),
            "train_images": metrics.get("train_images"), "promoted": metrics.get("promoted"),
            "decision": metrics.get("decision"), "serving": metrics["version"] == serving}


def info(model_dir: str) -> Dict[str, Any]:
    """For ``/info``: the serving version with its metrics, the newest versions, the split sizes."""
    record = serving_record(model_dir)
    every = list_versions(model_dir)
    split = read_split(split_path(model_dir))
    return {
        "serving": {k: v for k, v in record.items() if k != "validation_ids"} | (
            {"validation_images": len(record.get("validation_ids") or [])} if record else {}),
        "versions": [_short(m, record.get("version")) for m in reversed(every[-INFO_VERSIONS:])],
        "version_count": len(every),
        "history": history(model_dir)[-INFO_HISTORY:],
        "split": {side: len(ids) for side, ids in split.items()},
    }


# --- command line ---------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return "   -  " if value is None else f"{value:.4f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.versions", description=__doc__.split("\n")[0])
    where = argparse.ArgumentParser(add_help=False)  # --model-dir before or after the command
    where.add_argument("--model-dir", default=argparse.SUPPRESS, help="the server's model_dir (default: model/)")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="the server's model_dir (default: model/)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[where], help="every version, oldest first; * marks the serving one")
    back = sub.add_parser("rollback", parents=[where], help="make VERSION serve again (atomic; history kept)")
    back.add_argument("version")
    args = parser.parse_args(argv)
    model_dir = os.path.abspath(os.path.expanduser(args.model_dir))
    try:
        if args.command == "list":
            serving = serving_record(model_dir).get("version")
            every = list_versions(model_dir)
            if not every:
                print(f"no versions in {versions_dir(model_dir)}")
            for m in every:
                mark = "*" if m["version"] == serving else " "
                state = "promoted" if m.get("promoted") else "rejected"
                print(f"{mark} {m['version']}  dice {_fmt(m.get('val_mean_dice'))}  "
                      f"{len(m.get('validation_ids') or [])} val / {m.get('train_images') or 0} train  "
                      f"{state}: {m.get('decision', '')}")
            if serving and serving not in {m["version"] for m in every}:
                print(f"* {serving}  (serving, not registered as a version yet)")
        else:
            record = rollback(model_dir, args.version, by="command line")
            print(f"version {record['version']} serves (mean val Dice {_fmt(record.get('val_mean_dice'))})")
    except SpineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
