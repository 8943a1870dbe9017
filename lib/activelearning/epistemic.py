"""Strategy ``epistemic``: the unlabeled scans the serving model is least sure about.

Reads the scores written by :class:`lib.scoring.epistemic.EpistemicScoring`. Honours
``count`` in the request (MONAI Label's own strategy ignores it): the answer's ``id`` is
the most uncertain scan, ``ids`` the ``count`` most uncertain, best first.
"""

from __future__ import annotations

import logging
import random

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.epistemic import SCORE_KEY

logger = logging.getLogger(__name__)


class EpistemicStrategy(Strategy):
    def __init__(self):
        super().__init__("Most uncertain unlabeled scan (MC-dropout mutual information)")

    def __call__(self, request, datastore: Datastore):
        count = max(1, int(request.get("count", 1)))
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scores = {}
        for image_id in images:
            info = datastore.get_image_info(image_id).get(SCORE_KEY) or {}
            if "score" in info:
                scores[image_id] = float(info["score"])
        if not scores:
            # bootstrap: no trained model yet, so nothing is scored; any scan is as good as another
            chosen = random.sample(sorted(images), min(count, len(images)))
            logger.info(f"Epistemic: no scores yet, random pick {chosen}")
            return {"id": chosen[0], "ids": chosen, "fallback": "random (no epistemic scores yet)"}
        ranked = sorted(scores, key=lambda i: (-scores[i], i))[:count]
        logger.info(f"Epistemic: selected {ranked} of {len(images)} unlabeled")
        return {"id": ranked[0], "ids": ranked, "scores": [scores[i] for i in ranked]}
