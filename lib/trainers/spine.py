"""The ``spine`` train task: fine-tune SwinUNETR on every image with a ``final`` label.

Recipe (all numbers from the plan): DiceCE (or DiceFocal) with optional class weights, plus
the same loss on the four structure kinds (:class:`lib.grouping.KindAwareLoss`),
AdamW, linear warm-up then cosine decay (per epoch), sliding-window validation with
mean Dice over the 11 structures, early stopping on it, AMP only on CUDA, CacheDataset,
TensorBoard events in the run folder, ``train_stats.json`` for Slicer's progress bar.
The train/validation split is persisted (:mod:`lib.splits`); test images are left out.

When the run ends its best checkpoint becomes a version (:mod:`lib.versions`), measured
by :func:`measure` (mean and per-structure Dice) on the validation images, and serves
only if it does at least as well as the serving model on the same images
(:class:`ServingGuard`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from monai.handlers import LrScheduleHandler, MeanDice, from_engine
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import AsDiscreted, Compose, Lambdad
from monai.utils import set_determinism
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib import versions
from lib.autotrain import record_run_start
from lib.grouping import KindAwareLoss, decide
from lib.labels import BACKGROUND, IGNORE_VALUE, LABELS, NAMES, NUM_CLASSES
from lib.model_store import file_sha256, model_version, runs_dir, weights_path
from lib.networks import build_network, check_plan, load_network
from lib.plans import SpinePlan
from lib import splits
from lib.splits import split_path, test_ids, update_split
from lib.transforms import train_pre_transforms, val_pre_transforms

logger = logging.getLogger(__name__)

SPLIT_FILENAME = splits.SPLIT_FILENAME  # its home is lib.splits; named here too for lib.train_recipe


def image_key(record: Dict[str, Any]) -> str:
    """Datastore image id of a datalist record (the file name without its extension)."""
    name = os.path.basename(str(record["image"]).rstrip("/"))
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".zip"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


class SpineTrainTask(BasicTrainTask):
    def __init__(self, model_dir: str, plan: SpinePlan, **kwargs):
        self.plan = plan
        self.model_dir = model_dir
        super().__init__(
            model_dir=runs_dir(model_dir),
            description="Fine-tune the lumbar spine SwinUNETR on the final labels",
            amp=torch.cuda.is_available(),  # mixed precision only pays (and is only safe) on CUDA
            load_path=weights_path(model_dir),
            publish_path=None,  # ServingGuard publishes, MONAI Label's handler only writes stats
            stats_path=os.path.join(model_dir, "train_stats.json"),
            val_interval=plan.val_interval,
            n_saved=1,
            labels=LABELS,
            tracking=None,  # mlflow is not installed: TensorBoard events only
            config={
                "max_epochs": plan.max_epochs,
                "early_stop_patience": plan.early_stop_patience,
                "train_batch_size": plan.train_batch_size,
                "val_batch_size": 1,
                "dataset": "CacheDataset",
                "dataloader": "ThreadDataLoader",
                "tracking": "None",
                "multi_gpu": False,
            },
            **kwargs,
        )
        self.split_path = split_path(model_dir)
        self._guard: Optional[ServingGuard] = None

    # --- model and optimisation ------------------------------------------------------
    def network(self, context: Context):
        return build_network(self.plan)

    def optimizer(self, context: Context):
        return torch.optim.AdamW(
            context.network.parameters(), lr=self.plan.learning_rate, weight_decay=self.plan.weight_decay
        )

    def loss_function(self, context: Context):
        weight = torch.tensor(self.plan.class_weights, dtype=torch.float32) if self.plan.class_weights else None
        if weight is not None and len(weight) != NUM_CLASSES:
            raise ValueError(f"class_weights needs {NUM_CLASSES} values (background first), got {len(weight)}")
        base = DiceFocalLoss if self.plan.loss == "dice_focal" else DiceCELoss
        levels = base(to_onehot_y=True, softmax=True, weight=weight)
        if not self.plan.kind_loss_weight:
            return levels
        return KindAwareLoss(levels, base(to_onehot_y=True, softmax=True), self.plan.kind_loss_weight)

    def lr_scheduler_handler(self, context: Context):
        warmup = min(self.plan.warmup_epochs, max(context.max_epochs - 1, 0))
        scheduler = WarmupCosineSchedule(
            context.optimizer,
            warmup_steps=warmup,
            t_total=max(context.max_epochs, 1),
            # MONAI's ramp starts at 0: a first epoch that learns nothing would make the start
            # weights the run's "best" and, when fine-tuning, leave no real candidate
            warmup_multiplier=1.0 / (warmup + 1),
        )
        return LrScheduleHandler(lr_scheduler=scheduler, print_lr=True, epoch_level=True)

    # --- data ----------------------------------------------------------------------
    def pre_process(self, request, datastore):
        return [dict(r, id=image_key(r)) for r in datastore.datalist()]

    def partition_datalist(self, context: Context, shuffle=False):
        """The persisted split (:func:`lib.splits.update_split`); test images are in neither list."""
        records = {r["id"]: r for r in context.datalist}
        train_ids, val_ids = update_split(self.split_path, records, self.plan.val_fraction)
        held_out = len(set(records) & set(test_ids(self.split_path)))
        logger.info(f"Fixed split ({self.split_path}): {len(train_ids)} train, {len(val_ids)} validation, "
                    f"{held_out} test images left out")
        return [records[i] for i in train_ids], [records[i] for i in val_ids]

    def train_pre_transforms(self, context: Context):
        return train_pre_transforms(self.plan)

    def val_pre_transforms(self, context: Context):
        return val_pre_transforms(self.plan)

    def train_post_transforms(self, context: Context):
        return _onehot_post_transforms(self.plan)

    def val_post_transforms(self, context: Context):
        return _onehot_post_transforms(self.plan)

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(
            roi_size=self.plan.roi_size, sw_batch_size=self.plan.sw_batch_size, overlap=self.plan.sw_overlap,
            mode="gaussian",
        )

    def train_key_metric(self, context: Context):
        return {"train_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}

    def val_key_metric(self, context: Context):
        return {"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}

    def load_path(self, output_dir, pretrained=True):
        # fine-tune from what is serving now; from scratch when nothing is (bootstrap)
        if not (pretrained and os.path.exists(self._load_path)):
            return None
        check_plan(self._load_path, self.plan)  # never fine-tune weights of another network
        return self._load_path

    def finalize(self, context: Context):
        super().finalize(context)
        # MONAI Label would publish a run's best checkpoint even when it is worse than what
        # serves now; the guard decides once the run has ended (see __call__).
        self._guard = ServingGuard(self, context)

    def __call__(self, request, datastore):
        request = dict(request)
        for key in ("dataset", "dataloader", "tracking"):  # clients echo the option lists of /info
            if isinstance(request.get(key), list):
                request[key] = request[key][0]
        request["tracking"] = "None"
        if not torch.cuda.is_available():
            request["device"] = "cpu"
        datalist = datastore.datalist()
        if not datalist:
            raise ValueError("no image has a 'final' label yet: nothing to train on")
        if not {image_key(r) for r in datalist} - set(test_ids(self.split_path)):
            raise ValueError("every image with a 'final' label is held out for testing: nothing to train on")
        # every run moves the auto-train counters, also one started by a train request
        record_run_start(self.model_dir, [image_key(r) for r in datalist])
        set_determinism(seed=self.plan.train_seed)  # a run is reproducible (training runs in its own process)
        self._guard = None
        stats = super().__call__(request, datastore)
        if self._guard is not None:
            outcome = self._guard.conclude()
            if isinstance(stats, dict) and outcome:
                stats["version"] = {k: outcome.get(k) for k in ("version", "promoted", "decision", "val_mean_dice")}
        return stats


def dice_per_structure(pred: torch.Tensor, label: torch.Tensor) -> Dict[str, Optional[float]]:
    """Dice of each structure (by name) between two label maps; ``None`` where it is in neither."""
    scores: Dict[str, Optional[float]] = {}
    for value in range(NUM_CLASSES):
        if value == BACKGROUND:
            continue
        p, t = pred == value, label == value
        total = int(p.sum()) + int(t.sum())
        scores[NAMES[value]] = None if total == 0 else 2.0 * int((p & t).sum()) / total
    return scores


def measure(weights: str, records: Sequence[Dict[str, Any]], plan: SpinePlan, device: torch.device | str = "cpu",
            run_id: Optional[str] = None) -> Dict[str, Any]:
    """Mean and per-structure validation Dice of ``weights`` on ``records`` (image + label).

    One code path for the candidate and the serving model, so that they are compared on
    equal terms: the validation transforms, sliding-window inference, the plan's label decision, Dice per
    structure in model space. A structure's Dice is its mean over the images that contain
    it (in the reference or the prediction); the mean Dice is the mean over structures.
    Reference voxels of 255 (ignore) count for neither the reference nor the prediction.
    """
    network = load_network(plan, weights, device)
    pre = Compose(val_pre_transforms(plan, keep_ignore=True))
    inferer = SlidingWindowInferer(roi_size=plan.roi_size, sw_batch_size=plan.sw_batch_size, overlap=plan.sw_overlap,
                                   mode="gaussian")
    per_image: List[Dict[str, Optional[float]]] = []
    with torch.no_grad():
        for record in records:
            data = pre({"image": record["image"], "label": record["label"]})
            logits = inferer(data["image"][None].to(device), network)
            pred = decide(logits[0], plan.label_decision, dim=0).cpu()
            label = data["label"][0].round().long()
            ignore = label == IGNORE_VALUE
            per_image.append(dice_per_structure(pred.masked_fill(ignore, BACKGROUND), label.masked_fill(ignore, BACKGROUND)))
    per_structure: Dict[str, Optional[float]] = {}
    for name in (NAMES[v] for v in range(NUM_CLASSES) if v != BACKGROUND):
        values = [d[name] for d in per_image if d[name] is not None]
        per_structure[name] = sum(values) / len(values) if values else None
    present = [v for v in per_structure.values() if v is not None]
    return {
        "val_mean_dice": sum(present) / len(present) if present else None,
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

    def __init__(self, task: "SpineTrainTask", context: Context):
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
                    promote, reason = versions.compare(measured, current)
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


def _onehot_post_transforms(plan: SpinePlan) -> List[Any]:
    """Logits and label -> one-hot maps for MeanDice, by the decision the user gets."""
    return [
        Lambdad(keys="pred", func=lambda logits: decide(logits, plan.label_decision, dim=0)[None]),
        AsDiscreted(keys=("pred", "label"), to_onehot=(NUM_CLASSES, NUM_CLASSES)),
    ]
