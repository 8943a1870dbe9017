"""Strategy ``epistemic_diverse``: uncertain scans, unlike the ones already picked this round.

Suggestive annotation (Yang et al., MICCAI 2017) for the one-label-at-a-time loop of a
MONAI Label site: scores only change when a new model serves, so between two trainings the
plain ``epistemic`` strategy hands out the top of one fixed ranking, and the top scans are
often unsure for the same reason (the same weak level, the same artefact). Here:

1. shortlist the more uncertain half of the scored unlabeled scans (at least ``count``);
2. the *round* is the scans labelled since the serving model scored them (their image info
   still holds that model's score);
3. pick greedily: with an empty round, the most uncertain scan; else the shortlisted scan
   whose uncertainty profile is farthest (cosine distance) from its nearest scan in the
   round, ties to the more uncertain; each pick joins the round for the next.

The profile is :meth:`lib.scoring.epistemic.RunningMutualInformation.profile`: the mean
mutual information per label, i.e. *which structures* the model is unsure about. Without
profiles (scores of an older version) this is the ``epistemic`` ranking; without any score,
a random pick, as there.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Dict, List, Sequence

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.epistemic import SCORE_KEY

logger = logging.getLogger(__name__)


def cosine_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """``1 - cos(a, b)`` in [0, 2]; 1 when either vector is zero (nothing in common known)."""
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return 1.0 if norm == 0 else 1.0 - sum(x * y for x, y in zip(a, b)) / norm


def diverse_picks(scores: Dict[str, float], profiles: Dict[str, List[float]], round_profiles: List[List[float]],
                  count: int) -> List[str]:
    """``count`` ids of ``scores`` by steps 1 and 3 of the module docstring, in pick order.

    ``profiles``: per id of ``scores`` (ids without one are ranked by score only);
    ``round_profiles``: the scans already picked this round.
    """
    ranked = sorted(scores, key=lambda i: (-scores[i], i))
    shortlist = ranked[:max(count, math.ceil(len(ranked) / 2))]
    chosen: List[str] = []
    picked = [list(p) for p in round_profiles]
    while shortlist and len(chosen) < count:
        if not picked or not all(i in profiles for i in shortlist):
            best = shortlist[0]
        else:
            best = max(shortlist, key=lambda i: (min(cosine_distance(profiles[i], p) for p in picked), scores[i]))
        shortlist.remove(best)
        chosen.append(best)
        if best in profiles:
            picked.append(profiles[best])
    return chosen


class DiverseEpistemicStrategy(Strategy):
    def __init__(self):
        super().__init__("Uncertain unlabeled scan unlike those labelled since the last scoring "
                         "(MC-dropout mutual information per structure)")

    def __call__(self, request, datastore: Datastore):
        count = max(1, int(request.get("count", 1)))
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        infos = {i: datastore.get_image_info(i).get(SCORE_KEY) or {} for i in images}
        scored = {i: info for i, info in infos.items() if "score" in info}
        if not scored:
            chosen = random.sample(sorted(images), min(count, len(images)))
            logger.info(f"Epistemic diverse: no scores yet, random pick {chosen}")
            return {"id": chosen[0], "ids": chosen, "fallback": "random (no epistemic scores yet)"}
        versions = {info.get("model_version") for info in scored.values()}
        round_profiles = []
        for image_id in datastore.get_labeled_images():
            info = datastore.get_image_info(image_id).get(SCORE_KEY) or {}
            if info.get("model_version") in versions and info.get("profile"):
                round_profiles.append(info["profile"])
        scores = {i: float(info["score"]) for i, info in scored.items()}
        profiles = {i: info["profile"] for i, info in scored.items() if info.get("profile")}
        chosen = diverse_picks(scores, profiles, round_profiles, count)
        logger.info(f"Epistemic diverse: selected {chosen} of {len(images)} unlabeled "
                    f"({len(round_profiles)} picked this round)")
        return {"id": chosen[0], "ids": chosen, "scores": [scores[i] for i in chosen],
                "round": len(round_profiles)}
