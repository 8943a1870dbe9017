"""The 2.5D and 3D network modes: one interface, plans recorded with weights, no silent loads."""

from __future__ import annotations

import pytest
import torch

from lib.pipeline.errors import PlanMismatch
from lib.pipeline.networks import SagittalSlabNetwork, build_network, check_plan, load_network, load_weights
from lib.pipeline.plans import SpinePlan
from lib.train_recipe import save_weights

TINY = {"preset": "tiny"}


def _save(network: torch.nn.Module, path, plan: SpinePlan | None) -> str:
    """Weights, with the record of their plan unless ``plan`` is None."""
    if plan is None:
        torch.save(network.state_dict(), path)
    else:
        save_weights(network, path, {"plan": plan.to_dict()})
    return str(path)


def test_default_plan_is_2_5d_and_3d_stays_available():
    default, three_d = SpinePlan.from_conf({}), SpinePlan.from_conf({"preset": "3d"})
    assert default.network_mode == "2.5d" and default.slab_size == 3 and default.roi_size[0] == -1
    assert default.train_roi_size == (default.train_slices, *default.train_patch)
    assert three_d.network_mode == "3d" and three_d.train_roi_size == three_d.roi_size == (32, 96, 96)
    assert isinstance(build_network(default), SagittalSlabNetwork)
    assert not isinstance(build_network(SpinePlan.from_conf({"preset": "3d", "depths": "1,1,1,1"})),
                          SagittalSlabNetwork)
    with pytest.raises(ValueError, match="network_mode"):
        SpinePlan.from_conf({"network_mode": "2d"})
    with pytest.raises(ValueError, match="slab_size"):
        SpinePlan.from_conf({"slab_size": "2"})
    with pytest.raises(ValueError, match="multiples of 32"):
        SpinePlan.from_conf({"roi_size": "-1,100,256"})
    with pytest.raises(ValueError, match="multiple of 32"):
        SpinePlan.from_conf({"preset": "3d", "roi_size": "-1,96,96"})


def test_slab_network_segments_each_slice_from_its_neighbours():
    """forward on a 3D window == the 2D network on each slice's slab (edge slices repeated),
    whatever the slice batch; the output keeps the window's shape."""
    torch.manual_seed(0)
    plan = SpinePlan.from_conf({**TINY, "slab_size": "3", "slice_batch_size": "2", "dropout": "0"})
    network = build_network(plan).eval()
    x = torch.rand(2, 1, 5, 64, 64)
    with torch.no_grad():
        out = network(x)
        assert out.shape == (2, 12, 5, 64, 64)
        for b in range(2):
            for s in range(5):
                idx = [min(max(i, 0), 4) for i in (s - 1, s, s + 1)]
                expected = network.forward_slabs(x[b, 0, idx][None])[0]
                assert torch.allclose(out[b, :, s], expected, atol=1e-5), (b, s)
        network.slice_batch = 7
        assert torch.allclose(network(x), out, atol=1e-5)


def test_whole_slice_windows_take_any_in_plane_size():
    """roi_size Y/Z = -1: one window over the whole in-plane extent; the slab network pads
    it with air to multiples of 32 and gives back the input's size; on a size that needs
    no padding it is the plain network."""
    plan = SpinePlan.from_conf({**TINY, "roi_size": "-1,-1,-1", "dropout": "0"})
    assert plan.train_roi_size == (plan.train_slices, *plan.train_patch)  # training crops stay fixed
    torch.manual_seed(2)
    network = build_network(plan).eval()
    with torch.no_grad():
        odd = torch.rand(1, 1, 3, 50, 77)
        assert network(odd).shape == (1, 12, 3, 50, 77)
        padded = torch.zeros(1, 1, 3, 64, 96)
        padded[..., :50, :77] = odd
        assert torch.allclose(network(odd), network(padded)[..., :50, :77], atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 32"):
        SpinePlan.from_conf({"train_patch": "100,256"})


def test_fused_attention_gives_the_same_logits_in_2d():
    torch.manual_seed(1)
    plan = SpinePlan.from_conf({**TINY, "dropout": "0"})
    fused = build_network(plan).eval()
    plain = build_network(SpinePlan.from_conf({**TINY, "dropout": "0", "fused_attention": "false"})).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(1, 1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(fused(x), plain(x), atol=1e-4)


def test_weights_of_another_plan_are_refused_with_the_reason(tmp_path):
    tiny = SpinePlan.from_conf(TINY)
    tiny_3d = SpinePlan.from_conf({**TINY, "network_mode": "3d", "roi_size": "32,64,64"})
    recorded = _save(build_network(tiny_3d), tmp_path / "recorded.pt", tiny_3d)
    with pytest.raises(PlanMismatch, match="network_mode: weights '3d', server '2.5d'"):
        check_plan(recorded, tiny)
    with pytest.raises(PlanMismatch):
        load_network(tiny, recorded)
    # no record: a strict load decides, and says so clearly instead of loading partly
    unrecorded = _save(build_network(tiny_3d), tmp_path / "unrecorded.pt", None)
    with pytest.raises(PlanMismatch, match="do not fit the 2.5d network"):
        load_weights(build_network(tiny), unrecorded, tiny)
    # the same plan loads, and a record of the same plan passes
    same = _save(build_network(tiny), tmp_path / "same.pt", tiny)
    network = load_network(tiny, same)
    assert not network.training
    wider = SpinePlan.from_conf({**TINY, "slab_size": "5"})
    with pytest.raises(PlanMismatch, match="slab_size"):
        load_network(wider, same)
