"""A site on another kind of scan: the starter model before and after fine-tuning through
the server on a few of that site's corrected scans.

    python -m lib.site_adaptation --site fcs_VB2 --labelled fcs_VB2_06 fcs_VB2_08 fcs_VB2_10 \\
        --out work/site_vb2 [--evaluated ID ...] [--data ../shared/data] [--epochs 40] \\
        [--conf KEY VALUE ...]

1. **Before**: :mod:`lib.evaluate` of the starter weights (``model/spine.pt``) on the
   site's other scans (every case whose id starts with ``--site`` and is not labelled).
2. **The annotator**: each ``--labelled`` scan is pre-segmented by the starter model and
   corrected as an annotator who checks what the site's reference draws would correct it
   (:func:`simulated_correction`); a reference that draws only vertebral bodies (the
   ``fcs_VB*`` sets) yields a label whose bodies and levels are the reference's and whose
   other structures are the model's, accepted unchanged. The server trains on complete
   labels, as an annotator who corrects a pre-segmentation saves one: nothing of what the
   reference does not draw is taught as background.
3. **Through the server**: a real ``monailabel start_server`` for ``apps/spine`` on an empty
   ``model_dir`` (the starter model installs itself and serves), the labelled scans as its
   studies, their corrected labels saved as ``final`` over HTTP, one train request
   (fine-tuning the starter; the promotion gate compares the candidate with it on the
   site's validation image).
4. **After**: :mod:`lib.evaluate` of what serves then, and of the run's candidate when the
   gate kept the starter, on the same other scans.

Outputs in ``OUT``: ``eval_before/``, ``eval_after/`` (and ``eval_candidate/``), the
corrected labels in ``labels/``, ``server.log``, and ``summary.json`` /
``report.md`` (per group: Dice, or sensitivity for body-only references; level
identification; vertebra volume predicted, a check that sensitivity was not bought by
painting bone everywhere).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from lib.evaluate import list_label_files, load_manifest
from lib.evaluate import main as evaluate_main
from lib.pipeline.io import read_volume, write_label
from lib.pipeline.labels import NAMES, VERTEBRAE
from lib.simulate import DEFAULT_DATA, Client, Server, log, simulated_correction

REPO = Path(__file__).resolve().parents[1]
#: server settings of the fine-tuning run (``--conf`` adds or overrides)
DEFAULT_CONF: Dict[str, str] = {"auto_train": "false", "val_interval": "5", "warmup_epochs": "3"}


def _evaluate(data: Path, cases: List[str], model: Path, out: Path) -> Dict[str, Any]:
    """:mod:`lib.evaluate`'s summary of ``model`` on ``cases``, plus the mean predicted
    vertebra volume (mL, from each prediction's report)."""
    argv = ["--images", str(data / "images"), "--labels", str(data / "labels"), "--model", str(model),
            "--out", str(out), "--cases", *cases]
    if evaluate_main(argv) != 0:
        raise RuntimeError(f"lib.evaluate failed: {' '.join(argv)}")
    summary = json.loads((out / "summary.json").read_text())
    vertebrae = [NAMES[v] for v in VERTEBRAE]
    volumes = [sum(json.loads((out / "predictions" / f"{case}_seg.json").read_text())["volumes_ml"].get(name, 0.0)
                   for name in vertebrae) for case in cases]
    summary["vertebra_volume_ml"] = float(np.mean(volumes))
    return summary


def _row(name: str, summary: Dict[str, Any]) -> Dict[str, Any]:
    groups = summary["groups"]
    level = summary["level_identification"]
    return {
        "model": name,
        "vertebrae_dice": groups["vertebrae"]["dice"]["mean"],
        "vertebral_body_sensitivity": groups["vertebrae"]["body_only_sensitivity"]["mean"],
        "discs_dice": groups["discs"]["dice"]["mean"],
        "canal_dice": groups["canal"]["dice"]["mean"],
        "levels_correct": level["correct"], "levels_scored": level["total"],
        "missing": summary["counts"]["missing"], "duplicated": summary["counts"]["duplicated"],
        "vertebra_volume_ml": summary["vertebra_volume_ml"],
    }


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_report(summary: Dict[str, Any], path: Path) -> None:
    lines = [f"# Site adaptation: {summary['site']}", "",
             f"Labelled (corrected, trained on): {', '.join(summary['labelled'])}; evaluated: "
             f"{', '.join(summary['evaluated'])}. Fine-tuning: {summary['train']}.", "",
             "| model | vertebrae Dice | vertebral body sensitivity | discs Dice | canal Dice | levels | "
             "missing | duplicated | vertebra volume mL (mean) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['model']} | {_fmt(r['vertebrae_dice'])} | {_fmt(r['vertebral_body_sensitivity'])} | "
                     f"{_fmt(r['discs_dice'])} | {_fmt(r['canal_dice'])} | {r['levels_correct']}/{r['levels_scored']} | "
                     f"{r['missing']} | {r['duplicated']} | {r['vertebra_volume_ml']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    data, out = args.data.resolve(), args.out.resolve()  # the server runs in OUT: no relative paths
    site_cases = sorted(c for c in list_label_files(data / "labels") if c.startswith(args.site))
    unknown = [c for c in args.labelled if c not in site_cases]
    if unknown:
        raise SystemExit(f"--labelled {unknown}: not cases of {args.site} in {data / 'labels'}")
    evaluated = args.evaluated or [c for c in site_cases if c not in args.labelled]
    if set(evaluated) & set(args.labelled):
        raise SystemExit(f"{sorted(set(evaluated) & set(args.labelled))}: both labelled and evaluated")
    if not evaluated:
        raise SystemExit(f"every {args.site} case is labelled: nothing left to evaluate on")
    if out.exists():
        shutil.rmtree(out)
    (out / "labels").mkdir(parents=True)
    starter = Path(args.model)
    rows = [_row("starter", _evaluate(data, evaluated, starter, out / "eval_before"))]

    from lib.segment import SpineSegmenter

    manifest = load_manifest(data / "manifest.json")
    segmenter = SpineSegmenter(str(starter), {}, "cpu")
    studies = out / "studies"
    studies.mkdir()
    for case in args.labelled:
        image = data / "images" / f"{case}.nii.gz"
        reference, affine = read_volume(data / "labels" / f"{case}.nii.gz")
        prediction = segmenter.segment(image).label
        annotated = manifest.get(case, {}).get("annotated_labels") or list(range(1, 12))
        write_label(simulated_correction(prediction, reference, affine, annotated), affine,
                    out / "labels" / f"{case}.nii.gz")
        shutil.copy(image, studies / image.name)

    model_dir = out / "model"
    model_dir.mkdir()  # empty: the server installs the starter model in it
    conf = {**DEFAULT_CONF, "preset": "default", "max_epochs": str(args.epochs), **dict(args.conf)}
    started = time.time()
    with Server(studies, model_dir, out, conf) as server:
        client = Client(server, timeout=args.timeout)
        for case in args.labelled:
            client.save_label(case, out / "labels" / f"{case}.nii.gz")
        log(f"fine-tuning on {len(args.labelled)} corrected scans ({args.epochs} epochs)")
        client.train()
        status = client.wait_task("train")
        if not status or status.get("status") != "DONE":
            raise RuntimeError(f"training did not finish: {status}\n{server.tail()}")
        versions = client.versions()
    train_seconds = time.time() - started
    serving = json.loads((model_dir / "spine.json").read_text())["version"]
    rows.append(_row("after fine-tuning (serving)", _evaluate(data, evaluated, model_dir / "spine.pt",
                                                               out / "eval_after")))
    summary = {"site": args.site, "labelled": args.labelled, "evaluated": evaluated, "serving_version": serving,
               "versions": versions, "train_seconds": round(train_seconds, 1),
               "train": f"{args.epochs} epochs, server defaults otherwise ({json.dumps(conf)}), "
                        f"{train_seconds / 60:.1f} min with start-up",
               "rows": rows}
    cand_dir = model_dir / "versions"
    newest = sorted(p for p in cand_dir.iterdir() if (p / "spine.pt").exists()) if cand_dir.exists() else []
    if newest and newest[-1].name != serving:
        summary["candidate_version"] = newest[-1].name
        rows.append(_row(f"candidate {newest[-1].name} (not promoted)",
                         _evaluate(data, evaluated, newest[-1] / "spine.pt", out / "eval_candidate")))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_report(summary, out / "report.md")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib.site_adaptation", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="images/, labels/, manifest.json")
    parser.add_argument("--site", required=True, help="case id prefix of the site's scans (e.g. fcs_VB2)")
    parser.add_argument("--labelled", nargs="+", required=True, metavar="ID", help="the site's corrected scans")
    parser.add_argument("--evaluated", nargs="+", default=None, metavar="ID",
                        help="the site's scans to evaluate on (default: every other case of --site)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(REPO / "model" / "spine.pt"), help="the starter weights")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the fine-tuning run")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a training may take")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="server setting for the fine-tuning run")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server (its context) on kill
    summary = run(args)
    for row in summary["rows"]:
        print(json.dumps(row), file=sys.stderr)
    print(f"report: {args.out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
