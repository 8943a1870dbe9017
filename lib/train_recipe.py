"""Training recipe of the starter model (2.5D) on the development scans: resumable, CPU-feasible.

    python -m lib.train_recipe --data ../shared/data --work work/recipe [--steps 6000] [--hours 2]
    python -m lib.train_recipe ... --init model/spine.pt     # continue from the shipped weights
    python -m lib.train_recipe --work work/recipe --publish model   # ship the best weights

Stages (each with its home):
1. cases: reliable SPIDER scans (whole vertebrae, all 11 structures annotated), the unreliable
   ones (incomplete canal) left out; with ``--partial-sets fcs_VB3,fcs_IVD`` also sets that
   annotate only some structures (bodies only, discs only), learnt through the marginal loss
   of :mod:`lib.pipeline.losses` so that what they leave undrawn is never taught as background;
2. a fixed validation split (``--val-count`` reliable SPIDER scans, chosen by a hash of the id)
   that training never sees, written to ``WORK/split.json`` before the first step;
3. preprocessing: every case through the app's own chain (:func:`lib.pipeline.transforms.load_and_resample`:
   RAS, the plan's spacing, percentile intensities), cached in ``WORK/cache/``;
4. training on batches of sagittal slabs (:class:`SlabSampler`) drawn from all training scans
   through :meth:`lib.pipeline.networks.SagittalSlabNetwork.forward_slabs`: Dice (batch Dice, fully
   annotated slabs) + marginal cross-entropy (every slab; the plain cross-entropy for a full
   annotation) on the 12 labels, AdamW, linear warm-up then cosine over ``--steps``; a checkpoint every
   ``--checkpoint-every`` steps, so a killed run resumes by running the same command again;
5. validation every ``--val-every`` steps with the train task's own :func:`lib.lifecycle.promotion.measure`
   (whole scans, the app's sliding window and label decision); the best weights so far go to
   ``WORK/best/spine.pt`` with their record (plan + metrics), ready to copy into ``model/``.

Data-parallel on several processes (``torch.distributed``, DistributedDataParallel):

    torchrun --nproc_per_node 2 -m lib.train_recipe --data ../shared/data --work work/recipe

NCCL with one GPU a process when CUDA is present, gloo on CPUs; each process draws its own
slabs (its own random stream, so the processes share the sampling without repeating it),
gradients are averaged every step, and only rank 0 validates, writes checkpoints, the log
and the best weights; the others wait for it. ``--batch`` is per process (the effective
batch is ``--batch`` x processes; scale ``--lr`` with it if you keep the step count).
A process that dies ends the run (the others fail at the next gradient exchange); nothing
is published by a run (``--publish`` does that, on purpose), so a broken run leaves
``model/`` as it was and resumes from its last checkpoint. Several nodes: ``torchrun
--nnodes N --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...`` (see
``docs/deployment.md``).

The 3D plan (``--conf preset 3d``) is trained through the server's train task instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import Compose, RandAffined
from monai.networks.utils import one_hot
from monai.utils import set_determinism

from lib.evaluate import load_manifest, reliable_ids
from lib.lifecycle.model_store import file_sha256, record_path, version_id, weights_path
from lib.lifecycle.promotion import measure
from lib.pipeline.io import atomic_copy, atomic_output, atomic_write_text
from lib.pipeline.labels import DISCS, IGNORE_VALUE
from lib.pipeline.losses import COMPLETE, Annotation, marginal_cross_entropy
from lib.pipeline.networks import SagittalSlabNetwork, build_network, load_weights, select_device
from lib.pipeline.plans import SpinePlan
from lib.pipeline.transforms import intensity_augmentation, load_and_resample, thick_slice_slab

SPIDER_PREFIX = "spider_"
#: reliable SPIDER scans held out for validation (the dev validation split of the model card)
VAL_COUNT = 6


def choose_cases(data: Path, val_count: int) -> Tuple[List[str], List[str]]:
    """(training ids, validation ids): reliable SPIDER scans, validation chosen by a hash of the id."""
    reliable = reliable_ids(data, SPIDER_PREFIX)
    by_hash = sorted(reliable, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    validation = sorted(by_hash[:val_count])
    return [i for i in reliable if i not in validation], validation


def partial_cases(data: Path, prefixes: List[str]) -> Dict[str, Annotation]:
    """Reliable cases of the sets named by ``prefixes`` (``fcs_VB3``...) and what each annotates."""
    cases = load_manifest(data / "manifest.json")
    return {i: Annotation.from_manifest(c) for i, c in cases.items()
            if c.get("reliable") and i.startswith(tuple(prefixes))}


def preprocess(data: Path, cache: Path, case_id: str, plan: SpinePlan) -> Dict[str, np.ndarray]:
    """``image`` (X, Y, Z) float32 0..1 and ``label`` (X, Y, Z) uint8 at the plan's spacing, RAS;
    255 (ignore: T12 and above, unattributable pieces) kept."""
    path = cache / f"{case_id}.npz"
    if not path.exists():
        chain = Compose(load_and_resample(["image", "label"], plan, label_key="label", keep_ignore=True))
        d = chain({"image": str(data / "images" / f"{case_id}.nii.gz"),
                   "label": str(data / "labels" / f"{case_id}.nii.gz")})
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, image=np.asarray(d["image"][0], dtype=np.float32),
                            label=np.asarray(d["label"][0]).round().astype(np.uint8))
    with np.load(path) as f:
        return {"image": f["image"], "label": f["label"]}


class SlabSampler:
    """Random training samples: ``image`` (slab_size, Y, Z) float32, ``label`` (1, Y, Z) int64,
    ``annotation`` (what the label draws: :class:`lib.pipeline.losses.Annotation`).

    A sample is one sagittal slice of a random training scan (slices that hold labelled
    structures ``spine_weight`` times as likely as others) with its neighbours as channels
    (the scan's edge slice repeated, as :class:`SagittalSlabNetwork` does), cut to the plan's
    in-plane ROI. The window is centred on the labelled spine of that scan, moved by up to
    ``jitter_mm`` in each in-plane direction, so that most windows hold the whole lumbar spine
    with the sacrum (what tells the levels apart) and some cut it, as sliding windows do.
    With probability ``offcentre_fraction`` the window is instead placed as a sliding-window
    grid may place it on a larger field of view: anywhere that overlaps the labelled spine by
    at least ``min_overlap_mm`` in each in-plane direction, the spine off-centre and cut at the
    window's edge, zeros beyond the scan (what MONAI's sliding window pads with). Without such
    views the network's answer depends on where its window falls (the benchmark's stock
    pipeline on a full-field-of-view scan: see the README's *Speed*).
    With probability ``thick_slice_fraction`` the slab is made as a thick-slice clinical series
    of the same anatomy would give it (slices ``thick_slice_mm`` apart and as thick, resampled
    back to the plan's spacing: :func:`lib.pipeline.transforms.thick_slice_slab`); the label
    stays the true anatomy of the centre slice.
    With ``levels_need_l5s1``, a window that does not hold the scan's whole L5-S1 disc (the
    anchor the levels are counted from) teaches the kind of each structure but not its level
    (:class:`lib.pipeline.losses.Annotation` ``levels_known``): without the sacrum in view, L4
    and L5 look alike, and naming them anyway teaches the network to guess.
    Left-right flip reverses the neighbour order (never superior-inferior: that defines the
    levels); then the declarative 2D augmentation: affine, and the intensity augmentation
    shared with the server's train task (:func:`lib.pipeline.transforms.intensity_augmentation`).
    """

    def __init__(self, volumes: List[Dict[str, np.ndarray]], plan: SpinePlan, rng: np.random.Generator,
                 jitter_mm: Tuple[float, float] = (30.0, 50.0), spine_weight: float = 10.0,
                 annotations: List[Annotation] | None = None, partial_fraction: float = 0.25,
                 offcentre_fraction: float = 0.0, min_overlap_mm: float = 40.0,
                 thick_slice_fraction: float = 0.0, thick_slice_mm: Tuple[float, float] = (3.0, 5.0),
                 levels_need_l5s1: bool = False):
        for name, value in (("offcentre_fraction", offcentre_fraction), ("thick_slice_fraction", thick_slice_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.plan, self.rng = plan, rng
        self.offcentre_fraction = offcentre_fraction
        self.thick_slice_fraction = thick_slice_fraction
        self.levels_need_l5s1 = levels_need_l5s1
        # slice distance (= thickness) in model slices along the sagittal axis
        self.thick_slice_factor = tuple(mm / plan.target_spacing[0] for mm in thick_slice_mm)
        self.annotations = list(annotations or [COMPLETE] * len(volumes))
        self.roi = tuple(plan.train_roi_size[1:])
        self.k = plan.slab_size // 2
        self.jitter = [int(round(j / s)) for j, s in zip(jitter_mm, plan.target_spacing[1:])]
        self.min_overlap = [int(round(min_overlap_mm / s)) for s in plan.target_spacing[1:]]
        self.volumes, self.centres, self.spine_boxes, self.anchor_boxes, slices, weights = [], [], [], [], [], []
        for v, vol in enumerate(volumes):
            image, label = vol["image"], vol["label"]
            # zero-pad in-plane by the ROI once: every window is then a plain slice of the array
            pad = [(0, 0)] + [(r, r) for r in self.roi]
            self.volumes.append((np.pad(image, pad), np.pad(label, pad)))
            drawn = (label > 0) & (label != IGNORE_VALUE)
            spine_lo, spine_hi = self.in_plane_box(drawn)
            self.centres.append((spine_lo + spine_hi) // 2)
            self.spine_boxes.append((spine_lo, spine_hi))
            self.anchor_boxes.append(self.in_plane_box(label == DISCS[-1]))  # the L5-S1 disc, where drawn
            for x in range(image.shape[0]):
                slices.append((v, x))
                weights.append(spine_weight if drawn[x].any() else 1.0)
        self.slices = slices
        # two pools, fully and partially annotated scans; a sample is partial with ``partial_fraction``
        weights = np.asarray(weights, dtype=float)
        is_partial = np.array([not self.annotations[v].complete for v, _ in slices])
        if is_partial.any() and (~is_partial).any():
            weights[is_partial] *= partial_fraction / weights[is_partial].sum()
            weights[~is_partial] *= (1 - partial_fraction) / weights[~is_partial].sum()
        self.p = weights / weights.sum()
        self.augment = Compose([
            RandAffined(keys=["image", "label"], prob=0.5, rotate_range=(math.radians(10),),
                        scale_range=(0.1, 0.1), mode=("bilinear", "nearest"), padding_mode="zeros"),
            *intensity_augmentation(slice_axis=0),
        ])

    def sample(self) -> Dict[str, torch.Tensor]:
        v, x = self.slices[self.rng.choice(len(self.slices), p=self.p)]
        image, label = self.volumes[v]
        xs = np.clip(np.arange(x - self.k, x + self.k + 1), 0, image.shape[0] - 1)
        lo = self.window_origin(v)
        window = tuple(slice(a, a + r) for a, r in zip(lo, self.roi))
        if self.rng.random() < self.thick_slice_fraction:
            factor = self.rng.uniform(*self.thick_slice_factor)
            slab = thick_slice_slab(image, x, self.k, window, factor, self.rng.uniform(0, factor))
        else:
            slab = image[(xs,) + window]
        if self.rng.random() < 0.5:
            slab = slab[::-1]
        d = self.augment({"image": torch.from_numpy(np.ascontiguousarray(slab)),
                          "label": torch.from_numpy(label[(slice(x, x + 1),) + window].astype(np.float32))})
        annotation = self.annotations[v]
        if self.levels_need_l5s1 and not self.shows_anchor(v, lo):
            annotation = dataclasses.replace(annotation, levels_known=False)
        return {"image": torch.as_tensor(d["image"]).float(), "label": torch.as_tensor(d["label"]).round().long(),
                "annotation": annotation}

    def in_plane_box(self, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray] | None:
        """(Y, Z) first and last voxel of ``mask`` (X, Y, Z) in padded coordinates (the volumes
        are padded in-plane by the ROI), or None where the mask is empty."""
        where = np.argwhere(mask)
        if not len(where):
            return None
        return where.min(0)[1:] + np.array(self.roi), where.max(0)[1:] + np.array(self.roi)

    def shows_anchor(self, v: int, origin: np.ndarray) -> bool:
        """Whether the window at ``origin`` (padded coordinates) holds volume ``v``'s whole L5-S1
        disc (True where the volume has none drawn: nothing to judge by)."""
        box = self.anchor_boxes[v]
        if box is None:
            return True
        return bool(np.all(box[0] >= origin) and np.all(box[1] < origin + np.array(self.roi)))

    def window_origin(self, v: int) -> np.ndarray:
        """(Y, Z) first voxel of a window on volume ``v`` (padded coordinates): centred on the
        spine with the jitter, or, with ``offcentre_fraction``, anywhere overlapping it."""
        roi = np.array(self.roi)
        if self.rng.random() < self.offcentre_fraction:
            spine_lo, spine_hi = self.spine_boxes[v]
            overlap = np.minimum(self.min_overlap, (spine_hi - spine_lo + 1) // 2)
            # window [o, o + roi) overlaps [spine_lo, spine_hi] by >= overlap; the padding (roi
            # on each side) keeps every such window inside the padded array
            first = np.maximum(spine_lo + overlap - roi, 0)
            last = spine_hi + 1 - overlap
            return np.array([self.rng.integers(a, b + 1) for a, b in zip(first, last)])
        centre = self.centres[v] + np.array([self.rng.integers(-j, j + 1) for j in self.jitter])
        return centre - roi // 2

    def batch(self, size: int) -> Tuple[torch.Tensor, torch.Tensor, List[Annotation]]:
        samples = [self.sample() for _ in range(size)]
        return (torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples]),
                [s["annotation"] for s in samples])


class RecipeLoss:
    """Dice over the fully annotated slabs of a batch (batch Dice, MONAI) + the marginal
    cross-entropy over all of them (:func:`lib.pipeline.losses.marginal_cross_entropy`); for a batch of
    full annotations this is MONAI's DiceCE. Voxels labelled 255 (ignore) count in neither:
    read as background, the T12 vertebra and the T12-L1 disc above L1 look to the network like
    the sacrum below L5-S1, and it learnt to call the L5-S1 disc "L1-L2" (measured, see the
    model card)."""

    def __init__(self):
        self.dice = DiceLoss(batch=True)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, annotations: List[Annotation]) -> torch.Tensor:
        known = labels != IGNORE_VALUE  # (N, 1, Y, Z)
        labels = labels.masked_fill(~known, 0)
        loss = marginal_cross_entropy(logits, labels, annotations, known)
        complete = torch.tensor([a.complete for a in annotations], device=logits.device)
        if complete.any():
            mask = known[complete].float()
            probabilities = torch.softmax(logits[complete], 1) * mask
            target = one_hot(labels[complete], logits.shape[1]) * mask
            loss = loss + self.dice(probabilities, target)
        return loss


class SlabForward(torch.nn.Module):
    """``forward`` = :meth:`SagittalSlabNetwork.forward_slabs`: what DistributedDataParallel
    wraps, since it synchronises gradients only through a module's ``forward``."""

    def __init__(self, network: SagittalSlabNetwork):
        super().__init__()
        self.network = network

    def forward(self, slabs: torch.Tensor) -> torch.Tensor:
        return self.network.forward_slabs(slabs)


def start_distributed() -> Tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: under ``torchrun`` (``WORLD_SIZE`` > 1)
    the process group is joined (NCCL on CUDA, one GPU per local rank; gloo on CPU)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, select_device()
    cuda = torch.cuda.is_available()
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), world, device


def parameter_digest(network: torch.nn.Module) -> str:
    """sha256 of the parameters (processes of a data-parallel run end with the same one)."""
    h = hashlib.sha256()
    for name, value in sorted(network.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def save_weights(network: torch.nn.Module, path: Path, record: Dict) -> None:
    """Weights (state dict) + the record next to them (plan, metrics, sha256), both atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(network.state_dict(), tmp)
    atomic_write_text(record_path(str(path)), json.dumps({**record, "sha256": file_sha256(str(path))}, indent=1))


def keep_log_until(log_file: Path, step: int) -> None:
    """Drop the entries of ``log.jsonl`` (one JSON object a line) past ``step``, the checkpoint
    a run resumes from, so that the log describes the steps of the weights it ends with."""
    if not log_file.exists():
        return
    lines = [line for line in log_file.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        atomic_write_text(log_file, "".join(line + "\n" for line in kept))


def publish(work: Path, model_dir: Path) -> Dict:
    """The recipe's best weights become the serving model of ``model_dir`` (``spine.pt``) with
    a serving record (``spine.json``: version, sha256, plan, validation metrics, recipe)."""
    best = work / "best" / "spine.pt"
    if not best.exists():
        raise SystemExit(f"{best} does not exist: run the recipe first")
    facts = json.loads(Path(record_path(str(best))).read_text())
    weights = Path(weights_path(str(model_dir)))
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic_copy(str(best), weights)
    sha = file_sha256(str(weights))
    record = {"version": version_id(sha), "sha256": sha, "how": "starter",
              "reason": f"starter model: python -m lib.train_recipe, step {facts.get('step')}",
              "since": time.strftime("%Y-%m-%dT%H:%M:%S"), **{k: v for k, v in facts.items() if k != "sha256"}}
    atomic_write_text(record_path(str(weights)), json.dumps(record, indent=1))
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("work/recipe"))
    parser.add_argument("--steps", type=int, default=6000, help="length of the learning-rate schedule")
    parser.add_argument("--hours", type=float, default=24.0, help="stop (resumably) after this long")
    parser.add_argument("--batch", type=int, default=8, help="slabs per optimiser step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--val-count", type=int, default=VAL_COUNT)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--init", type=Path, help="start from these weights (e.g. model/spine.pt)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partial-sets", default="",
                        help="comma-separated case prefixes of partially annotated sets to train on too "
                             "(e.g. fcs_VB3,fcs_IVD)")
    parser.add_argument("--partial-fraction", type=float, default=0.25, help="share of slabs from those sets")
    parser.add_argument("--offcentre-fraction", type=float, default=0.0,
                        help="share of windows placed anywhere over the spine, as a sliding grid places "
                             "them, instead of centred on it (run F: 0.5; see the model card)")
    parser.add_argument("--levels-need-l5s1", action="store_true",
                        help="windows without the whole L5-S1 disc teach structure kinds, not levels")
    parser.add_argument("--thick-slice-fraction", type=float, default=0.0,
                        help="share of slabs made as a 3-5 mm thick-slice clinical series would give them "
                             "(run G: 0.4; see the model card)")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    parser.add_argument("--publish", type=Path, metavar="MODEL_DIR",
                        help="copy the best weights so far into MODEL_DIR as its serving model, then stop")
    args = parser.parse_args(argv)
    if args.publish:
        record = publish(args.work, args.publish)
        print(f"published {record['version']} (val mean Dice {record.get('val_mean_dice')}) to {args.publish}")
        return
    torch.set_num_threads(args.threads)
    plan = SpinePlan.from_conf(dict(args.conf))
    if plan.network_mode != "2.5d":
        parser.error("this recipe trains the 2.5d plan; train a 3d plan with the server's train task")
    rank, world, device = start_distributed()
    lead = rank == 0  # validates, writes checkpoints, the log and the best weights
    say = print if lead else (lambda *a, **k: None)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    split_file = work / "split.json"
    train_ids, val_ids = choose_cases(args.data, args.val_count)
    partial = partial_cases(args.data, [p for p in args.partial_sets.split(",") if p])
    cases = train_ids + sorted(partial)
    if lead:  # the others wait, then read what rank 0 wrote (no two processes write one file)
        if split_file.exists():
            saved = json.loads(split_file.read_text())
            if saved["validation"] != val_ids or saved["train"] != train_ids:
                raise SystemExit(f"{split_file} differs from the cases chosen now: refusing to mix splits")
        else:
            split_file.write_text(json.dumps({"train": train_ids, "validation": val_ids}, indent=1))
        volumes = [preprocess(args.data, work / "cache", i, plan) for i in cases]
    if world > 1:
        torch.distributed.barrier()
    say(f"{len(train_ids)} training scans, {len(val_ids)} validation scans: {val_ids}"
        + (f"; {world} processes" if world > 1 else ""), flush=True)
    if partial:
        say(f"{len(partial)} partially annotated scans: {sorted(partial)}", flush=True)
    if not lead:
        volumes = [preprocess(args.data, work / "cache", i, plan) for i in cases]
    annotations = [COMPLETE] * len(train_ids) + [partial[i] for i in sorted(partial)]
    val_records = [{"id": i, "image": str(args.data / "images" / f"{i}.nii.gz"),
                    "label": str(args.data / "labels" / f"{i}.nii.gz")} for i in val_ids]

    network: SagittalSlabNetwork = build_network(plan).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=plan.weight_decay)
    loss_function = RecipeLoss()
    checkpoint_file, best_file, log_file = work / "checkpoint.pt", work / "best" / "spine.pt", work / "log.jsonl"
    step, best = 0, -1.0
    if checkpoint_file.exists():
        state = torch.load(checkpoint_file, map_location=device, weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        if lead:
            keep_log_until(log_file, step)
        say(f"resumed at step {step} (best val mean Dice {best:.4f})", flush=True)
    elif args.init:
        load_weights(network, str(args.init), plan, device)
        say(f"starting from {args.init}", flush=True)
    forward = SlabForward(network)
    if world > 1:  # same start on every process (DDP broadcasts rank 0's parameters), averaged gradients
        forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=[device] if device.type == "cuda" else None)

    # each resume and each process its own random stream: a resumed run does not repeat the
    # samples it already saw, and the processes of one run draw different slabs
    seed = args.seed + step + 1_000_003 * rank
    set_determinism(seed=seed)
    sampler = SlabSampler(volumes, plan, np.random.default_rng(seed), annotations=annotations,
                          partial_fraction=args.partial_fraction, offcentre_fraction=args.offcentre_fraction,
                          thick_slice_fraction=args.thick_slice_fraction, levels_need_l5s1=args.levels_need_l5s1)
    deadline = time.time() + args.hours * 3600
    window_loss, window_start = [], time.time()
    while step < args.steps and not out_of_time(deadline, world, device):
        network.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        images, labels, batch_annotations = sampler.batch(args.batch)
        loss = loss_function(forward(images.to(device)), labels.to(device), batch_annotations)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window_loss.append(float(loss.detach()))
        if (step % args.checkpoint_every == 0 or step == args.steps) and not lead:
            torch.distributed.barrier()  # while rank 0 validates and writes
            window_loss = []
        elif step % args.checkpoint_every == 0 or step == args.steps:
            entry = {"step": step, "loss": round(float(np.mean(window_loss)), 4), "lr": optimizer.param_groups[0]["lr"],
                     "seconds_per_step": round((time.time() - window_start) / len(window_loss), 3)}
            window_loss, window_start = [], time.time()
            if step % args.val_every == 0 or step == args.steps:
                network.eval()
                save_weights(network, work / "last" / "spine.pt", {"plan": plan.to_dict(), "step": step})
                metrics = measure(str(work / "last" / "spine.pt"), val_records, plan, device)
                entry["val_mean_dice"] = metrics["val_mean_dice"]
                entry["per_structure_dice"] = metrics["per_structure_dice"]
                if metrics["val_mean_dice"] is not None and metrics["val_mean_dice"] > best:
                    best = metrics["val_mean_dice"]
                    save_weights(network, best_file, {"plan": plan.to_dict(), "step": step, **metrics,
                                                      "recipe": vars(args) | {"data": str(args.data),
                                                                              "work": str(work), "init": str(args.init)}})
                    entry["best"] = True
                window_start = time.time()
            # the log line first: a run stopped between the two leaves a log ahead of the
            # checkpoint, which the resume trims (keep_log_until), never a step it cannot see
            with open(log_file, "a") as f:
                f.write(json.dumps(entry) + "\n")
            state = {"model": network.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best}
            with atomic_output(checkpoint_file) as tmp:
                torch.save(state, tmp)
            print(json.dumps(entry), flush=True)
            if world > 1:
                torch.distributed.barrier()
    say(f"stopped at step {step} of {args.steps}; best val mean Dice {best:.4f} ({best_file})", flush=True)
    if world > 1:
        print(f"rank {rank} of {world}: parameters {parameter_digest(network)}", flush=True)
        torch.distributed.destroy_process_group()


def out_of_time(deadline: float, world: int, device: torch.device) -> bool:
    """Whether ``--hours`` is spent, decided by rank 0 for every process (they must stop at
    the same step, or the others would wait for a gradient exchange that never comes)."""
    late = torch.tensor([time.time() >= deadline], dtype=torch.uint8, device=device)  # NCCL: on the GPU
    if world > 1:
        torch.distributed.broadcast(late, src=0)
    return bool(late.item())


if __name__ == "__main__":
    main()
