"""Training recipe of the starter model on the development scans, resumable, CPU-feasible.

    python -m lib.train_recipe --data ../shared/data --work work/recipe [--hours 2] [--threads 2]

Stages:
1. cases: reliable SPIDER scans (whole vertebrae, all 11 structures annotated); the
   unreliable ones (incomplete canal) and the body-only/disc-only sets are left out of
   training because their unannotated structures would be learnt as background;
2. a fixed validation split (``--val-count`` reliable SPIDER scans, chosen by a hash of
   the id) that training never sees, written before the first run;
3. synthetic phantoms (``lib.phantom``) add full field-of-view context;
4. chunks of ``--epochs-per-chunk`` epochs of the app's own train task
   (:class:`lib.trainers.spine.SpineTrainTask`) on a real MONAI Label datastore folder;
   each chunk fine-tunes from the best weights so far (``work/model/spine.pt``), so a
   killed run resumes by running the same command again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import List, Tuple

import torch
from monailabel.datastore.local import LocalDatastore

from lib.phantom import save_phantom
from lib.plans import SpinePlan
from lib.splits import update_split
from lib.trainers.spine import SPLIT_FILENAME, SpineTrainTask


def choose_cases(data: Path, val_count: int) -> Tuple[List[str], List[str]]:
    cases = json.loads((data / "manifest.json").read_text())["cases"]
    reliable = sorted(c["id"] for c in cases if c["id"].startswith("spider_") and c.get("reliable"))
    by_hash = sorted(reliable, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    validation = sorted(by_hash[:val_count])
    return [i for i in reliable if i not in validation], validation


def build_studies(data: Path, studies: Path, case_ids: List[str], phantoms: int) -> None:
    """A MONAI Label studies folder: links to the real scans, ``labels/final`` with their masks."""
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    for case_id in case_ids:
        for src, dst in ((data / "images", studies), (data / "labels", final)):
            link = dst / f"{case_id}.nii.gz"
            if not link.exists():
                link.symlink_to((src / f"{case_id}.nii.gz").resolve())
    for seed in range(phantoms):
        image = studies / f"phantom_train_{seed:03d}.nii.gz"
        if not image.exists():
            save_phantom(str(image), str(final / image.name), seed=1000 + seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("work/recipe"))
    parser.add_argument("--hours", type=float, default=2.0, help="stop starting new chunks after this")
    parser.add_argument("--epochs-per-chunk", type=int, default=10)
    parser.add_argument("--val-count", type=int, default=6)
    parser.add_argument("--phantoms", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    train_ids, val_ids = choose_cases(args.data, args.val_count)
    studies, model_dir = args.work / "studies", args.work / "model"
    build_studies(args.data, studies, train_ids + val_ids, args.phantoms)
    model_dir.mkdir(parents=True, exist_ok=True)
    split_path = model_dir / SPLIT_FILENAME
    if not split_path.exists():
        split_path.write_text(json.dumps({"train": [], "validation": val_ids}, indent=1))
    datastore = LocalDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False)
    train, val = update_split(str(split_path), [d for d in _ids(datastore)], 0.0)
    assert sorted(val) == val_ids, "validation split changed: refusing to train"
    print(f"{len(train)} training images, {len(val)} validation images: {val}", flush=True)

    conf = {"max_epochs": str(args.epochs_per_chunk), "early_stop_patience": "0", "val_interval": "2",
            "warmup_epochs": "1", **dict(args.conf)}
    plan = SpinePlan.from_conf(conf)
    deadline = time.time() + args.hours * 3600
    log = args.work / "recipe_log.jsonl"
    chunk = sum(1 for _ in open(log)) if log.exists() else 0
    while time.time() < deadline:
        start = time.time()
        # each chunk its own seed: a seeded run would otherwise repeat the last chunk's crops
        chunk_plan = dataclasses.replace(plan, train_seed=plan.train_seed + chunk)
        stats = SpineTrainTask(str(model_dir), chunk_plan)({"name": "recipe"}, datastore)
        chunk += 1
        serving = json.loads((model_dir / "spine.json").read_text()) if (model_dir / "spine.json").exists() else {}
        entry = {"chunk": chunk, "epochs": args.epochs_per_chunk, "seconds": round(time.time() - start),
                 "best_val_mean_dice_this_chunk": stats.get("best_metric"), "serving": serving}
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)


def _ids(datastore: LocalDatastore) -> List[str]:
    from lib.trainers.spine import image_key

    return [image_key(r) for r in datastore.datalist()]


if __name__ == "__main__":
    main()
