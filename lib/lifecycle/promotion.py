"""Promotion: when a training run's best checkpoint becomes the serving model.

:class:`ServingGuard` concludes every run of the train task: it measures the candidate with
:func:`measure` on the site's validation images, measures the serving model on the *same*
images when they changed, registers the candidate as a version (:mod:`lib.lifecycle.versions`,
the home of versions, serving and rollback) and serves it only when it does at least as
well (:func:`lib.lifecycle.versions.compare`). The CPU recipe (``python -m lib.train_recipe``)
validates with the same :func:`measure`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from monai.transforms import Compose

from lib.lifecycle import versions
from lib.lifecycle.model_store import file_sha256, model_version, weights_path
from lib.pipeline.grouping import decide
from lib.pipeline.levels import finish_label
from lib.pipeline.metrics import structure_dice, summarise
from lib.pipeline.networks import load_network, sliding_window_inferer
from lib.pipeline.plans import SpinePlan
from lib.pipeline.transforms import val_pre_transforms

if TYPE_CHECKING:  # the train task imports this module
    from monailabel.tasks.train.basic_train import Context

    from lib.trainers.spine import SpineTrainTask

logger = logging.getLogger(__name__)


def measure(weights: str, records: Sequence[Dict[str, Any]], plan: SpinePlan, device: torch.device | str = "cpu",
            run_id: Optional[str] = None) -> Dict[str, Any]:
    """Mean and per-structure validation Dice of ``weights`` on ``records`` (image + label).

    One code path for the candidate and the serving model, so that they are compared on
    equal terms: the validation transforms, sliding-window inference, the plan's label decision,
    clean-up and level assignment (:func:`lib.pipeline.levels.finish_label`: what the user
    gets), Dice per structure in model space by the rules of :mod:`lib.pipeline.metrics`. The
    train task's validation key metric is the same Dice of the same output, so
    ``val_mean_dice`` means one thing.
    """
    network = load_network(plan, weights, device)
    pre = Compose(val_pre_transforms(plan, keep_ignore=True))
    inferer = sliding_window_inferer(plan)
    per_image: List[torch.Tensor] = []
    with torch.no_grad():
        for record in records:
            data = pre({"image": record["image"], "label": record["label"]})
            logits = inferer(data["image"][None].to(device), network)
            pred = decide(logits[0], plan.label_decision, dim=0).cpu().numpy().astype(np.uint8)
            pred = finish_label(pred, np.asarray(data["image"].affine), plan.min_island_ml, plan.midline_prior)[0]
            per_image.append(structure_dice(pred, data["label"][0].round().long()))
    mean, per_structure = summarise(torch.stack(per_image)) if per_image else (None, {})
    return {
        "val_mean_dice": mean,
        "per_structure_dice": per_structure,
        "validation_ids": sorted(r["id"] for r in records),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_id": run_id,
    }


class ServingGuard:
    """At the end of a run: store its best checkpoint as a version, and let it serve only if
    its mean validation Dice is at least the serving model's on the *same* images.

    The serving model's measurement lives in its record (``spine.json``); when the
    validation images changed since it was measured (new validation labels, a seeded
    validation list), the serving model is measured again on the current ones first.
    """

    ATTEMPTS = 3  # a rollback during the comparison means measuring the new serving model

    def __init__(self, task: "SpineTrainTask", context: "Context"):
        self.task, self.context = task, context
        self.model_dir = task.model_dir
        self.val_records = list(context.val_datalist)
        self.val_ids = sorted(r["id"] for r in self.val_records)
        self.parent = self._parent()  # finalize runs after the checkpoint to fine-tune from was loaded

    def _measure(self, weights: str) -> Dict[str, Any]:
        if not self.val_records:
            return {"val_mean_dice": None, "per_structure_dice": {}, "validation_ids": [],
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "run_id": self.context.run_id}
        return measure(weights, self.val_records, self.task.plan, self.context.device, self.context.run_id)

    def _serving_measured(self) -> Dict[str, Any]:
        """The serving record, measured on the current validation images (``{}``: none serves)."""
        record = versions.serving_record(self.model_dir)
        if (not record or not self.val_ids
                or (sorted(record.get("validation_ids") or []) == self.val_ids and record.get("val_mean_dice") is not None)):
            return record
        logger.info(f"Validation images changed since serving model {record['version']} was measured: "
                    f"measuring it on the current {len(self.val_ids)}")
        measurement = self._measure(weights_path(self.model_dir))
        versions.remeasure_serving(self.model_dir, record["sha256"], measurement)
        return versions.serving_record(self.model_dir)

    def conclude(self) -> Optional[Dict[str, Any]]:
        """Register the run's candidate and promote it or not; returns its version's metrics."""
        context = self.context
        candidate = os.path.join(context.output_dir, self.task._key_metric_filename)
        if not os.path.exists(candidate) or os.path.getmtime(candidate) < context.start_ts:
            logger.warning(f"Run {context.run_id} saved no checkpoint: no candidate version")
            return None
        current = versions.serving_record(self.model_dir)
        if current and file_sha256(candidate) == current.get("sha256"):
            # e.g. the first validation (warm-up: learning rate 0) was the run's best
            reason = "the run's best checkpoint is the serving model itself: nothing to promote"
            logger.info(f"Run {context.run_id}: {reason}")
            with versions.lock(self.model_dir):
                versions.add_event(self.model_dir, "unchanged", current["version"], reason=reason,
                                   by=f"run {context.run_id}")
            return {**current, "promoted": False, "decision": reason}
        measured = self._measure(candidate)
        trainer = context.trainer
        facts = {"source": "training", "run_id": context.run_id, **measured, "plan": self.task.plan.to_dict(),
                 "train_images": len(context.train_datalist), "val_images": len(self.val_records),
                 "epochs": int(trainer.state.epoch) if trainer is not None else None,
                 "trained_from": self.parent}
        for attempt in range(self.ATTEMPTS):
            serving = self._serving_measured()
            with versions.lock(self.model_dir):
                current = versions.serving_record(self.model_dir)
                same = current.get("sha256") == serving.get("sha256") and (
                    not current or not self.val_ids or sorted(current.get("validation_ids") or []) == self.val_ids)
                if not same and attempt + 1 < self.ATTEMPTS:
                    continue  # a rollback came in between: measure what serves now
                if same:
                    promote, reason = versions.compare(
                        measured, current, versions.starter_sha256(),
                        int(self.task.plan.extra.get("starter_min_val_images", versions.STARTER_MIN_VAL_IMAGES)))
                else:
                    promote, reason = False, "the serving model kept changing during the comparison: it stays"
                compared = ({"version": current.get("version"), "val_mean_dice": current.get("val_mean_dice")}
                            if current else None)
                metrics = versions.register(self.model_dir, candidate,
                                            {**facts, "promoted": promote, "decision": reason,
                                             "compared_with": compared})
                if promote:
                    versions.serve(self.model_dir, metrics["version"], "promoted", reason, by=f"run {context.run_id}")
                else:
                    versions.add_event(self.model_dir, "rejected", metrics["version"],
                                       previous=current.get("version"), reason=reason, by=f"run {context.run_id}")
                    logger.info(f"Candidate {metrics['version']} not promoted ({reason}): "
                                f"{current.get('version')} keeps serving")
                return metrics
        return None

    def _parent(self) -> Optional[str]:
        """The version this run fine-tunes from (None: from scratch)."""
        path = self.task.load_path(self.context.output_dir, self.context.pretrained)
        try:
            return model_version(path) if path else None
        except OSError:
            return None
