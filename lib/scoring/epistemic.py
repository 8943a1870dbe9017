"""Epistemic (MC-dropout) scoring of unlabeled scans.

For each scan without a ``final`` label, ``plan.mc_samples`` stochastic forward passes
(dropout on) give softmax maps ``p_s`` of shape ``(12, X, Y, Z)`` in model space. The
score is the mean mutual information (BALD) ``H[mean_s p_s] - mean_s H[p_s]`` (nats)
over the voxels any pass calls foreground: high where the passes disagree, i.e. where
the model's knowledge is thin, not where the image is merely ambiguous.

Scores are written into the datastore's image info under ``SCORE_KEY`` together with the
model version; a scan is re-scored only when the serving model changes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict

import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.model_store import model_version, weights_path
from lib.networks import build_network, enable_mc_dropout, select_device
from lib.plans import SpinePlan
from lib.transforms import infer_pre_transforms

logger = logging.getLogger(__name__)

SCORE_KEY = "epistemic_spine"


def mutual_information(probabilities: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """BALD per voxel: ``probabilities`` (S, C, X, Y, Z) -> (X, Y, Z) in nats."""
    mean = probabilities.mean(0)
    entropy_of_mean = -(mean * (mean + eps).log()).sum(0)
    mean_entropy = -(probabilities * (probabilities + eps).log()).sum(1).mean(0)
    return (entropy_of_mean - mean_entropy).clamp_min(0)


def epistemic_score(probabilities: torch.Tensor) -> float:
    """Mean mutual information over voxels that any sample labels as foreground."""
    mi = mutual_information(probabilities)
    foreground = (probabilities.argmax(1) > 0).any(0)
    region = mi[foreground] if foreground.any() else mi.flatten()
    return float(region.mean())


class EpistemicScoring(ScoringMethod):
    def __init__(self, model_dir: str, plan: SpinePlan):
        super().__init__(f"Epistemic uncertainty (MC dropout, {plan.mc_samples} samples, mutual information)")
        self.model_dir = model_dir
        self.plan = plan

    def info(self) -> Dict[str, Any]:
        return {"description": self.description, "samples": self.plan.mc_samples, "key": SCORE_KEY}

    def __call__(self, request, datastore: Datastore):
        path = weights_path(self.model_dir)
        try:
            version = model_version(path)
        except FileNotFoundError:
            logger.info("Epistemic scoring skipped: the model is untrained")
            return {"scored": 0, "skipped": "model untrained"}
        samples = int(request.get("samples", self.plan.mc_samples))
        todo = [
            image_id
            for image_id in datastore.get_unlabeled_images()
            if (datastore.get_image_info(image_id).get(SCORE_KEY) or {}).get("model_version") != version
            or (datastore.get_image_info(image_id).get(SCORE_KEY) or {}).get("samples") != samples
        ]
        if not todo:
            return {"scored": 0, "model_version": version}

        device = select_device(request.get("device"))
        network = build_network(self.plan).to(device)
        checkpoint = torch.load(path, map_location=device)
        network.load_state_dict(checkpoint.get("model", checkpoint))
        enable_mc_dropout(network)
        pre = Compose(infer_pre_transforms(self.plan))
        inferer = SlidingWindowInferer(
            roi_size=self.plan.roi_size,
            sw_batch_size=self.plan.sw_batch_size,
            overlap=self.plan.sw_overlap,
            mode="gaussian",
        )
        scored = {}
        for image_id in todo:
            start = time.time()
            try:
                image = pre({"image": datastore.get_image_uri(image_id)})["image"][None].to(device)
            except Exception as e:  # one unreadable scan must not stop the others
                logger.warning(f"Epistemic scoring: cannot read {image_id}: {e}")
                continue
            with torch.no_grad():
                probs = torch.stack([torch.softmax(inferer(image, network)[0], 0) for _ in range(samples)])
            score = epistemic_score(probs.float().cpu())
            info = {"score": score, "model_version": version, "samples": samples, "ts": int(time.time())}
            datastore.update_image_info(image_id, {SCORE_KEY: info})
            scored[image_id] = score
            logger.info(f"Epistemic score {image_id}: {score:.5f} ({time.time() - start:.1f} s)")
        return {"scored": len(scored), "model_version": version, "scores": scored}
