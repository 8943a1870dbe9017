"""The ``epistemic_diverse`` strategy: its pick rule, the per-structure profile it compares,
and the strategy over a real MONAI Label datastore."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.activelearning.diverse import DiverseEpistemicStrategy, cosine_distance, diverse_picks
from lib.scoring.epistemic import SCORE_KEY, RunningMutualInformation

SCORES = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.3, "e": 0.2, "f": 0.1}
PROFILES = {"a": [1.0, 0.0], "b": [1.0, 0.05], "c": [0.0, 1.0], "d": [0.0, 1.0], "e": [1.0, 1.0], "f": [0.0, 1.0]}


def test_cosine_distance():
    assert cosine_distance([1, 0], [2, 0]) == pytest.approx(0.0)
    assert cosine_distance([1, 0], [0, 3]) == pytest.approx(1.0)
    assert cosine_distance([0, 0], [1, 1]) == 1.0


def test_diverse_picks_take_the_most_uncertain_then_the_least_alike_of_the_uncertain_half():
    # a first; b is unsure about what a is unsure about, so c (the other structure) follows
    assert diverse_picks(SCORES, PROFILES, [], 2) == ["a", "c"]
    # d and f are as unlike a as c is, but not in the more uncertain half
    assert diverse_picks(SCORES, PROFILES, [], 3) == ["a", "c", "b"]
    # the round already holds a scan unsure like c: a (not c) is the least alike
    assert diverse_picks(SCORES, PROFILES, [[0.0, 2.0]], 1) == ["a"]
    assert diverse_picks(SCORES, PROFILES, [[3.0, 0.0]], 1) == ["c"]
    # without profiles: the plain epistemic ranking
    assert diverse_picks(SCORES, {}, [[3.0, 0.0]], 3) == ["a", "b", "c"]
    assert diverse_picks({"a": 0.1}, {}, [], 4) == ["a"]


def test_profile_is_the_mutual_information_per_predicted_label():
    """Two samples that agree on label 1 and disagree between labels 2 and 3 elsewhere."""
    running = RunningMutualInformation()
    first = torch.zeros(4, 2, 1, 1)
    second = torch.zeros(4, 2, 1, 1)
    first[1, 0], second[1, 0] = 1.0, 1.0  # voxel 0: both say label 1
    first[2, 1], second[3, 1] = 0.9, 0.9  # voxel 1: label 2 against label 3
    first[3, 1], second[2, 1] = 0.1, 0.1
    running.add(first)
    running.add(second)
    profile = running.profile()
    assert len(profile) == 3
    assert profile[0] == pytest.approx(0.0, abs=1e-6)  # agreement: no epistemic part
    assert sum(profile[1:]) > 0.2  # the disagreement shows under the label the mean prediction gives
    assert running.score() == pytest.approx(sum(profile) / 2, rel=1e-5)  # two foreground voxels, one unsure


def test_strategy_over_a_datastore(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    for name in ("s1", "s2", "s3", "s4", "s5", "done"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    datastore = LocalDatastore(str(tmp_path), extensions=("*.nii.gz",))
    strategy = DiverseEpistemicStrategy()
    first = strategy({"count": 2}, datastore)
    assert first["fallback"] and len(first["ids"]) == 2  # nothing scored yet: random

    stamp = {"model_version": "v1", "samples": 4, "method": "slices"}
    for image_id, score, profile in [("s1", 0.9, [1.0, 0.0]), ("s2", 0.8, [1.0, 0.0]), ("s3", 0.7, [0.0, 1.0]),
                                     ("s4", 0.1, [0.0, 1.0]), ("s5", 0.05, [1.0, 0.0]),
                                     ("done", 0.5, [1.0, 0.0])]:
        datastore.update_image_info(image_id, {SCORE_KEY: {"score": score, "profile": profile, **stamp}})
    assert strategy({}, datastore)["id"] == "s1"  # nothing labelled this round
    label = tmp_path.parent / f"{tmp_path.name}-label.nii.gz"  # outside the studies folder
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(label))
    datastore.save_label("done", str(label), "final", {})  # labelled after v1 scored it, unsure like s1
    answer = strategy({"count": 2}, datastore)
    assert answer["round"] == 1
    assert answer["ids"] == ["s3", "s1"]  # shortlist s1-s3: s3 is unlike the round, then s1 (ties: score)
