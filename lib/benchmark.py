"""Speed and memory of the app's infer path on real scans (figures for notes and the model card).

    python -m lib.benchmark [--scans FILE ...] [--model FILE] [--threads 2] [--repeat 2] [--conf KEY VALUE ...]

For each scan it runs the same code path as ``/infer/spine`` (``SpineSegmenter``): a
first (cold) infer, then ``--repeat`` warm ones with the model already loaded, and
prints wall time per stage and the process's peak resident memory. Without trained
weights (``model/spine.pt`` absent) it uses a freshly initialised network of the
configured architecture: timings depend on the architecture and the scan, not on the
weights' values (post-processing of a random output can differ slightly).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from lib.model_store import DEFAULT_MODEL_DIR, weights_path
from lib.networks import build_network
from lib.plans import SpinePlan
from lib.segment import SpineSegmenter

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample-data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def default_scans() -> List[Path]:
    return sorted(SAMPLE_DATA.glob("spider_*.nii.gz"))


def run(scans: List[Path], model: str | None, conf: Dict[str, str], repeat: int) -> None:
    plan = SpinePlan.from_conf(conf)
    model_path = model or weights_path(str(DEFAULT_MODEL_DIR))
    note = ""
    if not os.path.exists(model_path):
        model_path = os.path.join(tempfile.mkdtemp(), "random_init.pt")
        torch.save(build_network(plan).state_dict(), model_path)
        note = " (no trained weights: freshly initialised network)"
    print(f"threads {torch.get_num_threads()}; device cpu; plan preset {plan.preset}, feature_size "
          f"{plan.feature_size}, roi {plan.roi_size}, spacing {plan.target_spacing} mm, overlap {plan.sw_overlap}")
    print(f"weights {model_path}{note}")
    start = time.perf_counter()
    segmenter = SpineSegmenter(model_path, conf, device="cpu")
    print(f"model construction {time.perf_counter() - start:.2f} s; peak RSS {peak_rss_mb():.0f} MB")
    for scan in scans:
        for attempt in range(1 + repeat):
            start = time.perf_counter()
            result = segmenter.segment(scan)
            wall = time.perf_counter() - start
            lat = result.report.get("latencies", {})
            stages = ", ".join(f"{k} {lat[k]:.2f}" for k in ("pre", "infer", "invert", "post", "write") if k in lat)
            kind = "cold" if attempt == 0 else "warm"
            print(f"{scan.name} {result.label.shape} {kind}: wall {wall:.2f} s ({stages}); "
                  f"peak RSS {peak_rss_mb():.0f} MB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scans", nargs="*", type=Path, default=None, help="default: sample-data/spider_*.nii.gz")
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="warm infers after the first")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scans = args.scans or default_scans()
    if not scans:
        parser.error("no scans given and none found in sample-data/")
    run(scans, args.model, dict(args.conf), args.repeat)


if __name__ == "__main__":
    main()
