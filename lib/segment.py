"""Segment scans without a server: Python API and command line, same code path as ``/infer/spine``.

    python -m lib.segment INPUT [INPUT ...] --output DIR [--model FILE] [--conf KEY VALUE ...]
    python -m lib.segment @scans.txt --output DIR --workers 2      # a list, two processes

INPUT is a scan file (NIfTI, NRRD, MHA/MHD), a DICOM series folder, or a folder of scans;
``@FILE`` reads more inputs from FILE, one a line. INPUT may also be a DICOMweb URL
(``http(s)://.../dicom-web``): every series its search filter lists (MR by default, as the
server's ``--studies URL``; credentials from ``MONAI_LABEL_DICOMWEB_USERNAME``/``PASSWORD``)
is fetched when its turn comes (one series ahead of the workers, not the whole archive first),
segmented, and stored back in the PACS as an ``original`` DICOM SEG
(:func:`lib.server.dicomweb.store_original_seg`), which annotators then correct; series
that already have a SEG of this app (original or final) are skipped unless ``--redo``. Each scan gives ``DIR/<name>_seg.nii.gz``
(same shape and affine as the scan) and ``DIR/<name>_seg.json`` (volumes in mL, level
report, model version), the report written last and atomically: a scan whose report
exists for the same model version is skipped, so an interrupted batch resumes where it
stopped (``--redo`` segments everything again). ``--workers N`` segments with N processes,
each with its share of ``--threads`` (default: every core).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from lib.infers.spine import SpineInferTask
from lib.lifecycle.model_store import DEFAULT_MODEL_DIR, model_version, weights_path
from lib.pipeline.errors import SpineError
from lib.pipeline.io import SCAN_PATTERNS, atomic_write_text, image_id, read_volume
from lib.pipeline.networks import build_network, select_device
from lib.pipeline.plans import SpinePlan


@dataclass
class Segmentation:
    label: np.ndarray  # (X, Y, Z) uint8, values 0..11, the scan's own voxel grid
    affine: np.ndarray  # 4x4 voxel -> RAS mm, equal to the scan's
    report: Dict[str, Any]  # volumes_ml, levels, label_names, model_version, latencies
    path: Optional[str] = None  # written label file, when an output was asked for


class SpineSegmenter:
    """Load the model once, segment many scans."""

    def __init__(self, model_path: Optional[str] = None, conf: Optional[Dict[str, str]] = None,
                 device: Optional[str] = None):
        self.plan = SpinePlan.from_conf(conf)
        self.model_path = str(model_path or weights_path(str(DEFAULT_MODEL_DIR)))
        self.device = str(select_device(device))
        self.task = SpineInferTask(self.model_path, self.plan, build_network(self.plan))

    def segment(self, scan: str | os.PathLike, output: Optional[str | os.PathLike] = None) -> Segmentation:
        """Segment one scan (file or DICOM folder); write the label to ``output`` if given."""
        request = {"image": str(scan), "device": self.device, "result_extension": ".nii.gz",
                   "result_dtype": "uint8"}
        label_file, report = self.task(request)
        try:
            label, affine = read_volume(label_file)
            if output:
                os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
                shutil.move(label_file, output)
                label_file = None
        finally:
            if label_file and os.path.exists(label_file):
                os.remove(label_file)
        return Segmentation(label.astype(np.uint8), affine, report, str(output) if output else None)


def find_scans(inputs: Iterable[str]) -> List[Path]:
    """Expand folders: a folder of scan files gives each file; any other folder is a DICOM series."""
    scans: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted({f for pattern in SCAN_PATTERNS for f in item.glob(pattern)})
            scans.extend(files if files else [item])
        else:
            scans.append(item)
    return scans


def output_name(scan: Path) -> str:
    return image_id(str(scan))


def stem_in(output: str, scan: Path) -> str:
    """``output/<name>_seg``: where a scan's label (``.nii.gz``) and report (``.json``) go."""
    return os.path.join(output, f"{output_name(scan)}_seg")


def pacs_series_to_segment(url: str, conf: Dict[str, str], redo: bool):
    """(datastore, series UIDs) of a DICOMweb server's series that have no SEG of this app
    yet (all with ``redo``). Nothing is fetched yet: :func:`_scan_results` fetches each
    series into the datastore's cache (as the server does) when its turn comes, so that the
    first scans are segmented while the PACS still holds the rest, and a series that cannot
    be fetched fails alone."""
    from lib.server.dicomweb import init_dicomweb_datastore, segmented_series

    store = init_dicomweb_datastore(url, conf)
    series = store.list_images()
    done = {} if redo else segmented_series(store._client)
    todo = [s for s in series if s not in done]
    if len(todo) < len(series):
        print(f"{len(series) - len(todo)} of {len(series)} series already have a SEG "
              f"({', '.join(sorted(set(done[s] for s in series if s in done)))}): skipped", file=sys.stderr)
    return store, todo


def already_done(stem: str, version: Optional[str]) -> bool:
    """Whether ``<stem>.json`` reports a segmentation by model ``version`` (label file present)."""
    try:
        report = json.loads(Path(f"{stem}.json").read_text())
    except (OSError, ValueError):
        return False
    return report.get("model_version") == version and Path(f"{stem}.nii.gz").exists()


_WORKER: Dict[str, Any] = {}


def _start_worker(model: Optional[str], conf: Dict[str, str], device: Optional[str], threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    _WORKER["segmenter"] = SpineSegmenter(model, conf, device)


def _segment_one(scan: Path, stem: str) -> Tuple[str, Optional[Dict[str, Any]], Optional[str]]:
    """(scan, report, error) of one scan in a worker; label and report written under ``stem``."""
    try:
        result = _WORKER["segmenter"].segment(scan, f"{stem}.nii.gz")
    except SpineError as e:
        return str(scan), None, str(e)
    atomic_write_text(f"{stem}.json", json.dumps(result.report, indent=1, default=str))
    return str(scan), result.report, None


def _scan_results(items: List[Any], locate: Callable[[Any], Path], stem_of: Callable[[Path], str],
                  pool: Optional[Any], workers: int) -> Iterator[Tuple[Any, Optional[Path], Optional[Dict[str, Any]], Optional[str]]]:
    """(item, scan, report, error) for each item, as each is done: ``locate`` gives an item's
    scan (a file as it is; a PACS series fetched now), then this process or ``pool``
    segments it. The pool holds one scan more than it has workers, so that every worker is
    busy while the next series is fetched, and at most ``workers + 1`` fetched scans wait (a
    PACS archive is not copied to disk ahead of the segmentation)."""
    pending: Deque[Tuple[Any, Path, Any]] = deque()

    def collect(item, scan, job) -> Tuple[Any, Optional[Path], Optional[Dict[str, Any]], Optional[str]]:
        _, report, error = job.result()
        return item, scan, report, error

    for item in items:
        try:
            scan = locate(item)
        except Exception as e:  # a series the PACS will not give: the others go on
            yield item, None, None, f"not fetched: {e}"
            continue
        if pool is None:
            yield (item, scan) + _segment_one(scan, stem_of(scan))[1:]
            continue
        pending.append((item, scan, pool.submit(_segment_one, scan, stem_of(scan))))
        while len(pending) > workers:
            yield collect(*pending.popleft())
    while pending:
        yield collect(*pending.popleft())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], fromfile_prefix_chars="@")
    parser.add_argument("inputs", nargs="+", help="scan files, DICOM series folders, folders of scans, @LIST files")
    parser.add_argument("--output", required=True, help="folder for <name>_seg.nii.gz and <name>_seg.json")
    parser.add_argument("--model", default=None, help="weights file (default: model/spine.pt)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--workers", type=int, default=1, help="processes (each loads the model once)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all")
    parser.add_argument("--redo", action="store_true", help="segment scans already done by this model too")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="plan override, as on the server")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")

    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from tqdm import tqdm

    inputs = [line.strip() for line in args.inputs if line.strip()]
    urls = [i for i in inputs if i.startswith(("http://", "https://"))]
    if urls and len(urls) != len(inputs):
        parser.error("give either one DICOMweb URL or files and folders, not both")
    if len(urls) > 1:
        parser.error("one DICOMweb URL at a time")
    model = str(args.model or weights_path(str(DEFAULT_MODEL_DIR)))
    if not os.path.exists(model):
        print(f"{model}: no trained weights", file=sys.stderr)
        return 1
    version = model_version(model)
    pacs = None
    if urls:
        pacs, todo = pacs_series_to_segment(urls[0], dict(args.conf), args.redo)
        items, locate, total = todo, (lambda uid: Path(pacs.get_image_uri(uid))), len(todo)
    else:
        scans = find_scans(inputs)
        missing = [str(s) for s in scans if not s.exists()]
        if missing:
            parser.error(f"not found: {', '.join(missing)}")
        # the reports in --output say what is done (from a PACS, its SEGs do)
        todo = [scan for scan in scans if args.redo or not already_done(stem_in(args.output, scan), version)]
        if len(todo) < len(scans):
            print(f"{len(scans) - len(todo)} of {len(scans)} scans already segmented by model {version}: skipped",
                  file=sys.stderr)
        items, locate, total = todo, (lambda scan: scan), len(todo)
    os.makedirs(args.output, exist_ok=True)
    workers = min(args.workers, max(1, total))
    failures, start = 0, time.time()
    setup = (args.model, dict(args.conf), args.device, max(1, args.threads // workers))
    if workers == 1:  # in this process: no second start-up of torch
        _start_worker(*setup)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                   initargs=setup)
    results = _scan_results(items, locate, lambda scan: stem_in(args.output, scan), pool, workers)
    with pool or contextlib.nullcontext():
        for item, scan, report, error in tqdm(results, total=total, desc="segmenting", unit="scan",
                                              disable=total < 2, file=sys.stderr):
            if error:
                failures += 1
                tqdm.write(f"{scan or item}: {error}", file=sys.stderr)
                continue
            levels = report.get("levels", {})
            state = "levels consistent" if levels.get("consistent") else "; ".join(levels.get("messages", []))
            target = f"{stem_in(args.output, scan)}.nii.gz"
            if pacs is not None:
                from lib.server.dicomweb import store_original_seg

                try:
                    seg = store_original_seg(pacs, item, target)
                except Exception as e:  # an empty result, a PACS refusal: the others go on
                    failures += 1
                    tqdm.write(f"{scan}: not stored in the PACS: {e}", file=sys.stderr)
                    continue
                target = f"the PACS (SEG {seg.SeriesInstanceUID} of series {item})"
            tqdm.write(f"{scan} -> {target} ({state})", file=sys.stderr)
    if todo:
        elapsed = time.time() - start
        print(f"{len(todo) - failures} scans in {elapsed:.1f} s with {workers} process(es) "
              f"({3600 * (len(todo) - failures) / elapsed:.0f} scans/hour, model load included)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
