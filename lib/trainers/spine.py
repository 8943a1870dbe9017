"""The ``spine`` train task: fine-tune SwinUNETR on every image with a ``final`` label.

Recipe (all numbers from the plan): DiceCE (or DiceFocal) with optional class weights,
AdamW, linear warm-up then cosine decay (per epoch), sliding-window validation with
mean Dice over the 11 structures, early stopping on it, AMP only on CUDA, CacheDataset,
TensorBoard events in the run folder, ``train_stats.json`` for Slicer's progress bar.
The train/validation split is persisted (:mod:`lib.splits`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List

import numpy as np

import torch
from ignite.engine import Events
from monai.handlers import LrScheduleHandler, MeanDice, from_engine
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Activationsd, AsDiscreted
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.io import atomic_copy, atomic_write_text
from lib.labels import LABELS, NUM_CLASSES
from lib.model_store import runs_dir, weights_path
from lib.networks import build_network
from lib.plans import SpinePlan
from lib.splits import update_split
from lib.transforms import train_pre_transforms, val_pre_transforms

logger = logging.getLogger(__name__)

SPLIT_FILENAME = "split.json"


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
        self.split_path = os.path.join(model_dir, SPLIT_FILENAME)

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
        if self.plan.loss == "dice_focal":
            return DiceFocalLoss(to_onehot_y=True, softmax=True, weight=weight)
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)

    def lr_scheduler_handler(self, context: Context):
        scheduler = WarmupCosineSchedule(
            context.optimizer,
            warmup_steps=min(self.plan.warmup_epochs, max(context.max_epochs - 1, 0)),
            t_total=max(context.max_epochs, 1),
        )
        return LrScheduleHandler(lr_scheduler=scheduler, print_lr=True, epoch_level=True)

    # --- data ----------------------------------------------------------------------
    def pre_process(self, request, datastore):
        return [dict(r, id=image_key(r)) for r in datastore.datalist()]

    def partition_datalist(self, context: Context, shuffle=False):
        records = {r["id"]: r for r in context.datalist}
        train_ids, val_ids = update_split(self.split_path, records, self.plan.val_fraction)
        logger.info(f"Fixed split ({self.split_path}): {len(train_ids)} train, {len(val_ids)} validation")
        return [records[i] for i in train_ids], [records[i] for i in val_ids]

    def train_pre_transforms(self, context: Context):
        return train_pre_transforms(self.plan)

    def val_pre_transforms(self, context: Context):
        return val_pre_transforms(self.plan)

    def train_post_transforms(self, context: Context):
        return _onehot_post_transforms()

    def val_post_transforms(self, context: Context):
        return _onehot_post_transforms()

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(
            roi_size=self.plan.roi_size, sw_batch_size=self.plan.sw_batch_size, overlap=self.plan.sw_overlap
        )

    def train_key_metric(self, context: Context):
        return {"train_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}

    def val_key_metric(self, context: Context):
        return {"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=False)}

    def load_path(self, output_dir, pretrained=True):
        # fine-tune from what is serving now; from scratch when nothing is (bootstrap)
        return self._load_path if pretrained and os.path.exists(self._load_path) else None

    def finalize(self, context: Context):
        super().finalize(context)
        # MONAI Label publishes a run's best checkpoint even when it is worse than what serves
        # now; this guard keeps the serving weights unless validation Dice holds.
        engine = context.evaluator if context.evaluator is not None else context.trainer
        engine.add_event_handler(Events.EPOCH_COMPLETED, ServingGuard(self, context))

    def __call__(self, request, datastore):
        request = dict(request)
        for key in ("dataset", "dataloader", "tracking"):  # clients echo the option lists of /info
            if isinstance(request.get(key), list):
                request[key] = request[key][0]
        request["tracking"] = "None"
        if not torch.cuda.is_available():
            request["device"] = "cpu"
        if not datastore.datalist():
            raise ValueError("no image has a 'final' label yet: nothing to train on")
        return super().__call__(request, datastore)


class ServingGuard:
    """Record validation metrics of the serving weights; undo a publication that would regress.

    ``model_dir/spine.json`` holds the serving model's mean validation Dice and the ids of
    the validation images it was measured on. A run's checkpoint may replace the serving
    weights only if its Dice on the *same* validation images is at least as good.
    """

    def __init__(self, task: "SpineTrainTask", context: Context):
        self.task, self.context = task, context
        self.serving_path = task._load_path
        self.metrics_path = os.path.splitext(self.serving_path)[0] + ".json"
        self.val_ids = sorted(r["id"] for r in context.val_datalist)
        self.metric_name = "val_mean_dice" if context.evaluator is not None else "train_mean_dice"
        self.serving = self._load()

    def _load(self) -> Dict[str, Any]:
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                return json.load(f)
        return {}

    def __call__(self, engine) -> None:
        metric = float(engine.state.metrics.get(self.metric_name, float("nan")))
        best = float(engine.state.best_metric)
        if metric != best or not np.isfinite(metric):
            return  # not a new best of this run: MONAI Label does not publish either
        # without validation images there is nothing to compare on: the run's best serves
        comparable = bool(self.val_ids) and self.serving.get("validation_ids") == self.val_ids
        previous = float(self.serving.get("val_mean_dice", -1.0)) if comparable else -1.0
        candidate = os.path.join(self.context.output_dir, self.task._key_metric_filename)
        if metric < previous:
            logger.info(f"Candidate val Dice {metric:.4f} < serving {previous:.4f}: serving weights kept")
            return
        atomic_copy(candidate, self.serving_path)  # infer never reads half a file
        self.serving = {
            self.metric_name: metric,
            "validation_ids": self.val_ids,
            "train_images": len(self.context.train_datalist),
            "epoch": int(self.context.trainer.state.epoch),
            "run_id": self.context.run_id,
            "published": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(self.metrics_path, json.dumps(self.serving, indent=1))
        logger.info(f"Published weights with val Dice {metric:.4f} (previous {previous:.4f})")


def _onehot_post_transforms() -> List[Any]:
    return [
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(NUM_CLASSES, NUM_CLASSES)),
    ]
