"""TaskConfig of the ``spine`` model: one place that wires plan, network and tasks."""

from __future__ import annotations

import logging
from typing import Any, Dict

from monailabel.interfaces.config import TaskConfig
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.activelearning.diverse import DiverseEpistemicStrategy
from lib.activelearning.epistemic import EpistemicStrategy
from lib.infers.spine import SpineInferTask
from lib.lifecycle.model_store import weights_path
from lib.lifecycle.versions import install_starter
from lib.pipeline.labels import COLORS, LABELS
from lib.pipeline.networks import build_network
from lib.pipeline.plans import SpinePlan
from lib.scoring.epistemic import EpistemicScoring
from lib.trainers.spine import SpineTrainTask

logger = logging.getLogger(__name__)


class SpineConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.plan = SpinePlan.from_conf(conf)
        self.labels = LABELS
        self.label_colors = COLORS
        self.path = weights_path(model_dir)
        install_starter(model_dir, self.plan, enabled=str(conf.get("starter_model", "true")).lower() != "false")
        self.network = build_network(self.plan)
        logger.info(f"Model '{name}': plan {self.plan.to_dict()}; weights {self.path}")

    def infer(self):
        return {self.name: SpineInferTask(self.path, self.plan, self.network)}

    def trainer(self):
        return SpineTrainTask(self.model_dir, self.plan)

    def strategy(self):
        return {"epistemic": EpistemicStrategy(), "epistemic_diverse": DiverseEpistemicStrategy(), "random": Random(),
                "first": First()}

    def scoring_method(self):
        return {"epistemic": EpistemicScoring(self.model_dir, self.plan)}
