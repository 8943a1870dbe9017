"""Epistemic (MC-dropout) scoring of unlabeled scans.

For each scan without a ``final`` label, ``plan.mc_samples`` stochastic forward passes
(dropout on) give softmax maps ``p_s`` of shape ``(12, X, Y, Z)`` in model space. The
score is the mean mutual information (BALD) ``H[mean_s p_s] - mean_s H[p_s]`` (nats)
over the voxels any pass calls foreground (by the plan's ``label_decision``):
high where the passes disagree, i.e. where the model's knowledge is thin, not where the
image is merely ambiguous.

Three ways to compute it (``--conf score_method auto|slices|full|fast``; ``auto``, the
default, is ``slices`` for the 2.5D network and ``full`` for the 3D one):

* ``full``: what MONAI Label's epistemic scoring does, ``mc_samples`` sliding-window passes
  over the body-cropped scan at the model spacing with the infer window layout (the
  default of the 3D plan);
* ``slices`` (2.5D only, its default): the same passes on every ``score_slice_step``-th sagittal slice
  (each from its own slab of neighbours, so a scored slice is computed exactly as in the
  full computation), the samples of each in-plane window as one batch; the score is the
  mean mutual information over the foreground of the scored slices;
* ``fast``: the same passes on the scan resampled to the coarser ``score_spacing`` and
  covered by windows fitted to it, without overlap, each window's samples computed as one
  batch (:func:`sample_stack`): 2.5-9x cheaper by scan, but on the weights we have its
  ranking of scans does not follow the full computation's (the network sees anatomy at a
  scale it was not trained on; figures in the README's *Speed*), so it is not the
  default; ``python -m lib.benchmark`` measures both again for any weights.

(Sampling only the deep Swin stages once the shallow ones are shared was tried and
dropped: the mutual information comes mostly from the dropout of the shallow stages, and
the ranking did not follow the full computation.)

Scores are written into the datastore's image info under ``SCORE_KEY`` together with the
per-label profile (:meth:`RunningMutualInformation.profile`) and the model version; a scan is re-scored only when the serving model changes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.lifecycle.model_store import model_version, weights_path
from lib.pipeline.grouping import decide
from lib.pipeline.networks import (SagittalSlabNetwork, enable_mc_dropout, load_network, select_device,
                                   sliding_window_inferer)
from lib.pipeline.plans import SCORE_METHODS, SpinePlan
from lib.pipeline.transforms import infer_pre_transforms

logger = logging.getLogger(__name__)

SCORE_KEY = "epistemic_spine"
EPS = 1e-8


def mutual_information(probabilities: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """BALD per voxel: ``probabilities`` (S, C, X, Y, Z) -> (X, Y, Z) in nats."""
    mean = probabilities.mean(0)
    entropy_of_mean = -(mean * (mean + eps).log()).sum(0)
    mean_entropy = -(probabilities * (probabilities + eps).log()).sum(1).mean(0)
    return (entropy_of_mean - mean_entropy).clamp_min(0)


def epistemic_score(probabilities: torch.Tensor, decision: str = "argmax") -> float:
    """Mean mutual information over voxels that any sample labels as foreground."""
    mi = mutual_information(probabilities)
    foreground = (decide((probabilities + EPS).log(), decision, dim=1) > 0).any(0)
    region = mi[foreground] if foreground.any() else mi.flatten()
    return float(region.mean())


class RunningMutualInformation:
    """:func:`epistemic_score` from samples added one at a time, in constant memory.

    Holds the sum of the probabilities, the sum of their entropies and the union of the
    foregrounds, each the size of one sample, instead of all samples.
    """

    def __init__(self, decision: str = "argmax"):
        self.decision = decision  # the label decision that says which voxels are foreground
        self.count = 0
        self.sum_p: Optional[torch.Tensor] = None
        self.sum_entropy: Optional[torch.Tensor] = None
        self.foreground: Optional[torch.Tensor] = None

    def add(self, probabilities: torch.Tensor) -> None:
        """One sample's softmax ``(C, X, Y, Z)``."""
        p = probabilities.float()
        entropy = -(p * (p + EPS).log()).sum(0)
        foreground = decide((p + EPS).log(), self.decision, dim=0) > 0
        if self.count == 0:
            self.sum_p, self.sum_entropy, self.foreground = p.clone(), entropy, foreground
        else:
            self.sum_p += p
            self.sum_entropy += entropy
            self.foreground |= foreground
        self.count += 1

    def _mean_and_mi(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.count:
            raise ValueError("no samples added")
        mean = self.sum_p / self.count
        mi = (-(mean * (mean + EPS).log()).sum(0) - self.sum_entropy / self.count).clamp_min(0)
        return mean, mi

    def score(self) -> float:
        _, mi = self._mean_and_mi()
        region = mi[self.foreground] if self.foreground.any() else mi.flatten()
        return float(region.mean())

    def profile(self) -> List[float]:
        """Mean mutual information (nats) over the voxels the mean prediction gives each
        foreground label ``1..C-1`` (0 where it gives none): *where* the model is unsure,
        which :mod:`lib.activelearning.diverse` compares between scans."""
        mean, mi = self._mean_and_mi()
        decided = decide((mean + EPS).log(), self.decision, dim=0)
        return [float(mi[decided == c].mean()) if (decided == c).any() else 0.0 for c in range(1, mean.shape[0])]


def fitted_roi(shape: Tuple[int, ...], max_roi: Tuple[int, ...], multiple: int = 32) -> Tuple[int, ...]:
    """Smallest window of multiples of ``multiple`` voxels covering ``shape``, at most ``max_roi``.

    One side stays at least ``2 * multiple``: SwinUNETR's bottleneck needs more than one voxel.
    A ``max_roi`` entry of -1 (the 2.5D network's slice axis: every slice) stays -1.
    """
    roi = [r if r <= 0 else min(r, multiple * max(1, math.ceil(s / multiple))) for s, r in zip(shape, max_roi)]
    if all(r in (multiple, -1) for r in roi):
        longest = max(range(len(roi)), key=lambda i: (max_roi[i] > multiple, shape[i]))
        roi[longest] = min(max_roi[longest], 2 * multiple)
    return tuple(roi)


def sample_stack(network: torch.nn.Module, samples: int):
    """A sliding-window predictor: window ``(B, 1, X, Y, Z)`` -> ``(B, samples * C, X, Y, Z)``,
    the logits of ``samples`` dropout passes computed as one batch of ``B * samples``.

    One batched call instead of ``samples`` calls: the window is cut and blended once,
    and PyTorch's CPU convolution takes its oneDNN path for batches above one (it falls
    back to a much slower kernel for small single-item 3D inputs).
    """

    def predictor(window: torch.Tensor) -> torch.Tensor:
        logits = network(window.repeat_interleave(samples, 0))
        return logits.reshape(window.shape[0], samples * logits.shape[1], *logits.shape[2:])

    return predictor


class EpistemicScorer:
    """MC-dropout mutual information of one scan, by the ``full``, ``slices`` or ``fast`` computation."""

    def __init__(self, network: torch.nn.Module, plan: SpinePlan, device: str | torch.device = "cpu"):
        self.plan = plan
        self.device = torch.device(device)
        self.network = enable_mc_dropout(network.to(self.device))
        self.pre = Compose(infer_pre_transforms(plan))

    def prepare(self, image_path: str) -> torch.Tensor:
        """Scan -> ``(1, X, Y, Z)`` at the model spacing, normalised and body-cropped (as infer)."""
        return self.pre({"image": image_path})["image"]

    def score(self, image: torch.Tensor, method: Optional[str] = None, samples: Optional[int] = None,
              seed: int = 0, step: Optional[int] = None) -> float:
        """Mean mutual information (nats) of ``samples`` stochastic passes over ``image`` (1, X, Y, Z).

        ``seed`` fixes the dropout masks, so a score is reproducible.
        """
        return self.measure(image, method, samples, seed, step).score()

    def measure(self, image: torch.Tensor, method: Optional[str] = None, samples: Optional[int] = None,
                seed: int = 0, step: Optional[int] = None) -> RunningMutualInformation:
        """The passes of :meth:`score`, accumulated: ``.score()`` and ``.profile()`` of one scan."""
        method = method or self.plan.score_computation
        samples = int(samples or self.plan.mc_samples)
        x = torch.as_tensor(image, dtype=torch.float32)[None].to(self.device)
        if method == "slices":
            return self._score_slices(x, samples, seed, step or self.plan.score_slice_step)
        if method == "full":
            inferer = sliding_window_inferer(self.plan)
        elif method == "fast":
            scale = [a / b for a, b in zip(self.plan.target_spacing, self.plan.score_spacing)]
            size = [max(1, round(s * f)) for s, f in zip(x.shape[2:], scale)]
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
            inferer = SlidingWindowInferer(fitted_roi(tuple(size), self.plan.roi_size), sw_batch_size=1,
                                           overlap=0.0, mode="constant")
        else:
            raise ValueError(f"score_method must be one of {SCORE_METHODS}, got {method!r}")
        running = RunningMutualInformation(self.plan.label_decision)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                if method == "fast":  # each window's samples as one batch
                    stacked = inferer(x, sample_stack(self.network, samples))[0]  # (samples * C, X, Y, Z)
                    for logits in stacked.reshape(samples, -1, *stacked.shape[1:]):
                        running.add(torch.softmax(logits, 0).cpu())
                else:
                    for _ in range(samples):
                        running.add(torch.softmax(inferer(x, self.network)[0], 0).cpu())
        finally:
            torch.random.set_rng_state(generator_state)
        return running


    def slice_probabilities(self, x: torch.Tensor, samples: int, step: int) -> torch.Tensor:
        """Softmax of ``samples`` passes on every ``step``-th sagittal slice of ``x``
        ``(1, 1, X, Y, Z)``: ``(samples, C, n, Y, Z)``. Each scored slice comes from its slab of
        neighbours (edge slices repeated) through the plan's in-plane windows, as in the
        full computation; each window's samples go through the network as one batch."""
        network = self.network
        if not isinstance(network, SagittalSlabNetwork):
            raise ValueError("slice scoring needs the 2.5d network")
        nx = x.shape[2]
        k = network.slab_size // 2
        chosen = list(range(min(step // 2, nx - 1), nx, step))
        slabs = torch.stack([x[0, 0, [min(max(i, 0), nx - 1) for i in range(c - k, c + k + 1)]] for c in chosen])
        inferer = SlidingWindowInferer(self.plan.roi_size[1:], sw_batch_size=self.plan.sw_batch_size,
                                       overlap=self.plan.sw_overlap, mode="gaussian")
        stacked = inferer(slabs, sample_stack(network.forward_slabs, samples))  # (n, samples * C, Y, Z)
        logits = stacked.reshape(len(chosen), samples, -1, *stacked.shape[2:])
        return torch.softmax(logits, 2).permute(1, 2, 0, 3, 4)

    def _score_slices(self, x: torch.Tensor, samples: int, seed: int, step: int) -> RunningMutualInformation:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                probabilities = self.slice_probabilities(x, samples, step).cpu()
        finally:
            torch.random.set_rng_state(generator_state)
        running = RunningMutualInformation(self.plan.label_decision)
        for sample in probabilities:
            running.add(sample)
        return running


class EpistemicScoring(ScoringMethod):
    def __init__(self, model_dir: str, plan: SpinePlan):
        super().__init__(f"Epistemic uncertainty (MC dropout, {plan.mc_samples} samples, mutual information, "
                         f"{plan.score_computation} computation)")
        self.model_dir = model_dir
        self.plan = plan

    def info(self) -> Dict[str, Any]:
        return {"description": self.description, "samples": self.plan.mc_samples, "key": SCORE_KEY,
                "method": self.plan.score_computation}

    def __call__(self, request, datastore: Datastore):
        path = weights_path(self.model_dir)
        try:
            version = model_version(path)
        except FileNotFoundError:
            logger.info("Epistemic scoring skipped: the model is untrained")
            return {"scored": 0, "skipped": "model untrained"}
        samples = int(request.get("samples", self.plan.mc_samples))
        stamp = {"model_version": version, "samples": samples, "method": self.plan.score_computation}
        todo = [
            image_id
            for image_id in datastore.get_unlabeled_images()
            if any((datastore.get_image_info(image_id).get(SCORE_KEY) or {}).get(k) != v for k, v in stamp.items())
        ]
        if not todo:
            return {"scored": 0, "model_version": version}

        device = select_device(request.get("device"))
        network = load_network(self.plan, path)
        scorer = EpistemicScorer(network, self.plan, device)
        scored = {}
        for image_id in todo:
            start = time.time()
            try:
                image = scorer.prepare(datastore.get_image_uri(image_id))
            except Exception as e:  # one unreadable scan must not stop the others
                logger.warning(f"Epistemic scoring: cannot read {image_id}: {e}")
                continue
            measured = scorer.measure(image, samples=samples)
            score = measured.score()
            datastore.update_image_info(image_id, {SCORE_KEY: {"score": score, "profile": measured.profile(),
                                                               **stamp, "ts": int(time.time())}})
            scored[image_id] = score
            logger.info(f"Epistemic score {image_id}: {score:.5f} ({time.time() - start:.1f} s)")
        return {"scored": len(scored), "model_version": version, "scores": scored}
