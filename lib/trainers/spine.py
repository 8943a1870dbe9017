"""The ``spine`` train task: fine-tune SwinUNETR on every image with a ``final`` label.

Recipe (all numbers from the plan): DiceCE (or DiceFocal) with optional class weights, plus
the same loss on the four structure kinds (:class:`lib.pipeline.grouping.KindAwareLoss`),
AdamW, linear warm-up then cosine decay (per epoch), sliding-window validation with
mean Dice over the 11 structures, early stopping on it, AMP only on CUDA, CacheDataset,
TensorBoard events in the run folder, ``train_stats.json`` for Slicer's progress bar.
The train/validation split is persisted (:mod:`lib.lifecycle.splits`); test images are left out.

When the run ends its best checkpoint becomes a version, measured on the validation images,
and serves only if it does at least as well as the serving model on the same images
(:class:`lib.lifecycle.promotion.ServingGuard`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from ignite.engine import Events
from monai.handlers import LrScheduleHandler
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.optimizers import WarmupCosineSchedule
from monai.transforms import Lambdad
from monai.utils import set_determinism
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.lifecycle.autotrain import record_run_start
from lib.lifecycle.model_store import runs_dir, weights_path
from lib.lifecycle.promotion import ServingGuard
from lib.lifecycle.splits import split_path, test_ids, update_split
from lib.pipeline.grouping import KindAwareLoss, decide
from lib.pipeline.io import atomic_write_text, image_id
from lib.pipeline.labels import LABELS, NUM_CLASSES
from lib.pipeline.levels import finish_label
from lib.pipeline.metrics import dice_handler
from lib.pipeline.networks import build_network, check_plan, sliding_window_inferer
from lib.pipeline.plans import SpinePlan
from lib.pipeline.transforms import train_pre_transforms, val_pre_transforms

logger = logging.getLogger(__name__)


def image_key(record: Dict[str, Any]) -> str:
    """Datastore image id of a datalist record (:func:`lib.pipeline.io.image_id` of its image)."""
    return image_id(str(record["image"]))


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
        """The persisted split (:func:`lib.lifecycle.splits.update_split`); test images are in neither list."""
        records = {r["id"]: r for r in context.datalist}
        train_ids, val_ids = update_split(self.split_path, records, self.plan.val_fraction)
        held_out = len(set(records) & set(test_ids(self.split_path)))
        logger.info(f"Fixed split ({self.split_path}): {len(train_ids)} train, {len(val_ids)} validation, "
                    f"{held_out} test images left out")
        return [records[i] for i in train_ids], [records[i] for i in val_ids]

    def train_pre_transforms(self, context: Context):
        return train_pre_transforms(self.plan)

    def val_pre_transforms(self, context: Context):
        return val_pre_transforms(self.plan, keep_ignore=True)  # lib.pipeline.metrics leaves 255 out

    def train_post_transforms(self, context: Context):
        return _label_post_transforms(self.plan)

    def val_post_transforms(self, context: Context):
        return _label_post_transforms(self.plan, finish=True)

    def val_inferer(self, context: Context):
        return sliding_window_inferer(self.plan)

    def train_key_metric(self, context: Context):
        return {"train_mean_dice": dice_handler()}

    def val_key_metric(self, context: Context):
        return {"val_mean_dice": dice_handler()}

    def load_path(self, output_dir, pretrained=True):
        # fine-tune from what is serving now; from scratch when nothing is (bootstrap)
        if not (pretrained and os.path.exists(self._load_path)):
            return None
        check_plan(self._load_path, self.plan)  # never fine-tune weights of another network
        return self._load_path

    def finalize(self, context: Context):
        super().finalize(context)
        if context.multi_gpu:
            # MONAI Label destroys the process group as soon as a process's trainer ends, and
            # gloo aborts a process (SIGABRT, "Connection closed by peer") whose peer closed
            # first; the trainers end at different moments (rank 0 also publishes): all
            # processes meet here before any of them lets go of the group.
            context.trainer.add_event_handler(Events.COMPLETED, lambda _: torch.distributed.barrier())
        # MONAI Label would publish a run's best checkpoint even when it is worse than what
        # serves now; the guard decides once the run has ended (see train), on rank 0 only.
        self._guard = ServingGuard(self, context) if context.local_rank == 0 else None

    # --- one process, or several (torch.distributed) ---------------------------------
    def train(self, rank, world_size, request, datalist):
        """One process's run (MONAI Label calls it once, or in each spawned process); rank 0
        then concludes the promotion, so that it happens once and also when the run was
        spread over processes (whose objects the calling process never sees)."""
        if request.get("multi_gpu"):  # a spawned process: seeded like the calling one, per rank
            set_determinism(seed=self.plan.train_seed + rank)
            if not torch.cuda.is_available():
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))
        self._guard = None
        stats = super().train(rank, world_size, request, datalist)
        if rank == 0 and self._guard is not None:
            outcome = self._guard.conclude()
            if isinstance(stats, dict) and outcome:
                stats["version"] = {k: outcome.get(k) for k in ("version", "promoted", "decision", "val_mean_dice")}
                if request.get("multi_gpu"):  # the calling process answers with the stats file
                    atomic_write_text(self._stats_path, json.dumps(stats, indent=2, default=str))
        return stats

    def _device(self, context: Context):
        if context.multi_gpu and not torch.cuda.is_available():
            return torch.device("cpu")  # gloo processes on the CPU (plan.train_processes)
        return super()._device(context)

    def _create_network_and_optimizer(self, context: Context):
        if not (context.multi_gpu and context.device.type == "cpu"):
            return super()._create_network_and_optimizer(context)
        network = self.network(context).to(context.device)
        context.network = network
        optimizer = self.optimizer(context)
        return torch.nn.parallel.DistributedDataParallel(network), optimizer

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
        request.update(self._processes_request())
        return super().__call__(request, datastore)

    def _processes_request(self) -> Dict[str, Any]:
        """How MONAI Label is to spread the run (``plan.train_processes``): one process; several
        GPUs (its own NCCL path); or, without CUDA, several CPU processes joined by gloo over
        loopback (its path counts CUDA devices only, so the process count is given as ids)."""
        n = self.plan.train_processes
        if n <= 1:
            return {"multi_gpu": False}
        if torch.cuda.is_available():
            return {"multi_gpu": True, "gpus": ",".join(str(i) for i in range(min(n, torch.cuda.device_count())))}
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return {"multi_gpu": True, "gpus": ",".join(str(i) for i in range(n)), "distributed_backend": "gloo",
                "distributed_url": f"tcp://127.0.0.1:{port}"}


def _label_post_transforms(plan: SpinePlan, finish: bool = False) -> List[Any]:
    """Logits -> the label map ``(1, *spatial)`` by the plan's decision, for
    :func:`lib.pipeline.metrics.dice_handler`; with ``finish`` (whole validation images) also
    clean-up and level assignment, so that ``val_mean_dice`` is the Dice of what the user
    gets, as in :func:`lib.lifecycle.promotion.measure`. ``label`` stays a label map (255 kept)."""
    chain: List[Any] = [Lambdad(keys="pred", func=lambda logits: decide(logits, plan.label_decision, dim=0)[None])]
    if finish:
        chain.append(Lambdad(keys="pred", func=lambda pred: _finished(pred, plan)))
    return chain


def _finished(pred: torch.Tensor, plan: SpinePlan) -> torch.Tensor:
    """``pred`` (1, X, Y, Z) MetaTensor in model space -> the same after :func:`finish_label`."""
    label, _ = finish_label(pred[0].cpu().numpy().astype(np.uint8), np.asarray(pred.affine), plan.min_island_ml,
                            plan.midline_prior)
    return torch.as_tensor(label, dtype=torch.long)[None]
