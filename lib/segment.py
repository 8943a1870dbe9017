"""Segment scans without a server: Python API and command line, same code path as ``/infer/spine``.

    python -m lib.segment INPUT [INPUT ...] --output DIR [--model FILE] [--conf KEY VALUE ...]

INPUT is a scan file (NIfTI, NRRD, MHA/MHD), a DICOM series folder, or a folder of scans.
Each scan gives ``DIR/<name>_seg.nii.gz`` (same shape and affine as the scan) and
``DIR/<name>_seg.json`` (volumes in mL, level report, model version).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from lib.pipeline.errors import SpineError
from lib.infers.spine import SpineInferTask
from lib.pipeline.io import SCAN_PATTERNS, image_id, read_volume
from lib.lifecycle.model_store import DEFAULT_MODEL_DIR, weights_path
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="scan files, DICOM series folders, or folders of scans")
    parser.add_argument("--output", required=True, help="folder for <name>_seg.nii.gz and <name>_seg.json")
    parser.add_argument("--model", default=None, help="weights file (default: model/spine.pt)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="plan override, as on the server")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    scans = find_scans(args.inputs)
    missing = [str(s) for s in scans if not s.exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    segmenter = SpineSegmenter(args.model, dict(args.conf), args.device)
    os.makedirs(args.output, exist_ok=True)
    failures = 0
    for scan in tqdm(scans, desc="segmenting", unit="scan", disable=len(scans) < 2, file=sys.stderr):
        stem = os.path.join(args.output, f"{output_name(scan)}_seg")
        try:
            result = segmenter.segment(scan, f"{stem}.nii.gz")
        except SpineError as e:
            failures += 1
            print(f"{scan}: {e}", file=sys.stderr)
            continue
        with open(f"{stem}.json", "w") as f:
            json.dump(result.report, f, indent=1, default=str)
        levels = result.report.get("levels", {})
        state = "levels consistent" if levels.get("consistent") else "; ".join(levels.get("messages", []))
        tqdm.write(f"{scan} -> {stem}.nii.gz ({state})", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
