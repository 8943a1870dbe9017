"""Network factory: the SwinUNETR that every stage (infer, train, scoring) builds from the plan.

Input  ``(B, 1, X, Y, Z)`` float32, normalised MR intensities in RAS (X = right->left,
so every ``x`` index is one sagittal slice).
Output ``(B, NUM_CLASSES, X, Y, Z)`` logits (background + 11 structures).

Two network modes (``plan.network_mode``), one interface, so that transforms, sliding
window, inversion and post-processing are one code path for both:

- ``2.5d`` (default): :class:`SagittalSlabNetwork`, a 2D SwinUNETR applied to every
  sagittal slice with its ``slab_size - 1`` neighbours as extra channels; Y and Z must be
  multiples of 32, X is any number of slices.
- ``3d``: MONAI's 3D SwinUNETR; every spatial dim a multiple of 32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention

from lib.lifecycle.model_store import recorded_plan
from lib.pipeline.errors import PlanMismatch
from lib.pipeline.labels import NUM_CLASSES
from lib.pipeline.plans import SpinePlan

# MONAI 1.5's sliding window indexes each window with a list of slices; torch 2.13 still reads
# that as a tuple and warns at every window batch, so the warning filled the server and
# evaluation logs. The pins hold both (requirements.txt); a torch that read the list otherwise
# would fail the sliding-window tests (tests/test_speed.py), not pass silently.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                        category=UserWarning, module=r"monai\.inferers\.utils")


class FusedWindowAttention(WindowAttention):
    """MONAI's Swin window attention, computed by PyTorch's fused ``scaled_dot_product_attention``
    when no gradient is needed (infer, validation, MC-dropout scoring).

    Same parameters and the same result (to float rounding) as :class:`WindowAttention`; the
    relative position bias and the shifted-window mask are summed into one additive mask, and
    the fused kernel never materialises the ``(windows, heads, 343, 343)`` attention matrix
    that dominates the CPU time of an fs-12 SwinUNETR (its heads are only 4 channels wide).
    Training keeps MONAI's own computation and gradients.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x, mask)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index[:n, :n].reshape(-1)]
        bias = bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, n, n)
        dropout = self.attn_drop.p if self.attn_drop.training else 0.0

        def attend(q, k, v, additive):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=additive.to(q.dtype), dropout_p=dropout,
                                                  scale=self.scale)

        if mask is None:
            out = attend(q, k, v, bias)
        else:  # windows are batch-major: the mask of window i serves items i, i + nw, i + 2 nw, ...
            nw = mask.shape[0]
            additive = bias + mask.unsqueeze(1)  # (nw, heads, n, n)
            # one call per batch item: a mask broadcast over a fifth dimension sends PyTorch to its slow path
            out = torch.cat([attend(q[s:s + nw], k[s:s + nw], v[s:s + nw], additive) for s in range(0, b, nw)])
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


#: SwinUNETR halves its input five times: every spatial size must be a multiple of this
PATCH_MULTIPLE = 32


class SagittalSlabNetwork(torch.nn.Module):
    """A 2D network run over the sagittal slices of 3D windows (2.5D segmentation).

    ``forward``: ``(B, 1, X, Y, Z)`` -> ``(B, C, X, Y, Z)``. Slice ``x`` is segmented from the
    slab ``x - k .. x + k`` (``k = slab_size // 2``) stacked as channels; at the window's
    left/right edges the edge slice is repeated. Slices go through the 2D network
    ``slice_batch`` at a time, which bounds memory on wide windows.

    ``forward_slabs``: ``(N, slab_size, Y, Z)`` -> ``(N, C, Y, Z)``, the 2D network itself
    (the training recipe feeds it batches of slabs from many scans).
    """

    def __init__(self, net2d: torch.nn.Module, slab_size: int, slice_batch: int = 16):
        super().__init__()
        if slab_size < 1 or slab_size % 2 == 0:
            raise ValueError(f"slab_size must be odd and positive, got {slab_size}")
        self.net2d = net2d
        self.slab_size = slab_size
        self.slice_batch = max(1, slice_batch)

    def forward_slabs(self, slabs: torch.Tensor) -> torch.Tensor:
        """Slabs of any in-plane size: zero-padded (air, as around a training window) to the
        multiples of 32 the 2D SwinUNETR needs, the output cropped back."""
        ny, nz = slabs.shape[-2:]
        pad_y, pad_z = -ny % PATCH_MULTIPLE, -nz % PATCH_MULTIPLE
        if not (pad_y or pad_z):
            return self.net2d(slabs)
        out = self.net2d(torch.nn.functional.pad(slabs, (0, pad_z, 0, pad_y)))
        return out[..., :ny, :nz]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, X, Y, Z), got {tuple(x.shape)}")
        b, _, nx, ny, nz = x.shape
        k = self.slab_size // 2
        # (B, X, Y, Z) as a plain tensor: a MetaTensor batch cannot be sliced into slices
        volume = x.as_subclass(torch.Tensor)[:, 0]
        if k:
            volume = torch.cat([volume[:, :1].expand(b, k, ny, nz), volume, volume[:, -1:].expand(b, k, ny, nz)], 1)
        # (B, X, slab, Y, Z) -> (B * X, slab, Y, Z): slice x of item i is row i * X + x
        slabs = volume.unfold(1, self.slab_size, 1).permute(0, 1, 4, 2, 3).reshape(b * nx, self.slab_size, ny, nz)
        out = torch.cat([self.forward_slabs(slabs[s:s + self.slice_batch])
                         for s in range(0, slabs.shape[0], self.slice_batch)])
        return out.reshape(b, nx, -1, ny, nz).transpose(1, 2)


def build_network(plan: SpinePlan) -> torch.nn.Module:
    """A freshly initialised network of the plan's mode (no pretrained weights: nothing is
    downloaded): :class:`SagittalSlabNetwork` around a 2D SwinUNETR, or a 3D SwinUNETR.

    With ``plan.fused_attention`` its window attention is :class:`FusedWindowAttention`
    (same weights, state dicts interchangeable).
    """
    slab = plan.network_mode == "2.5d"
    network = SwinUNETR(
        in_channels=plan.slab_size if slab else 1,
        out_channels=NUM_CLASSES,
        feature_size=plan.feature_size,
        depths=tuple(plan.depths),
        drop_rate=plan.dropout,
        spatial_dims=2 if slab else 3,
        use_checkpoint=False,
    )
    if slab:
        network = SagittalSlabNetwork(network, plan.slab_size, plan.slice_batch_size)
    if plan.fused_attention:
        for module in network.modules():
            if type(module) is WindowAttention:
                module.__class__ = FusedWindowAttention
    return network


def check_plan(weights: str, plan: SpinePlan) -> None:
    """Refuse weights whose record names another network than ``plan`` builds.

    The record is the JSON next to the weights (``spine.json``) or the stored version's
    metrics (:func:`lib.lifecycle.model_store.recorded_plan`); weights without a recorded plan are
    judged by a strict load in :func:`load_weights`.
    """
    recorded = recorded_plan(weights)
    if not recorded:
        return
    wanted = plan.network_signature()
    differing = {k: (recorded.get(k), v) for k, v in wanted.items()
                 if k in recorded and _comparable(recorded[k]) != _comparable(v)}
    if differing:
        fields = "; ".join(f"{k}: weights {a!r}, server {b!r}" for k, (a, b) in differing.items())
        raise PlanMismatch(
            f"the weights {weights} were built for another plan ({fields}): start the server with the "
            f"matching --conf values, or point --conf model_dir at weights built for this plan")


def _comparable(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def load_weights(network: torch.nn.Module, weights: str, plan: SpinePlan,
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a state dict (or ``{"model": state dict}``) strictly into ``network``, after
    :func:`check_plan`; a file that does not fit the network raises :class:`PlanMismatch`
    with the reason instead of loading partly."""
    check_plan(weights, plan)
    checkpoint = torch.load(weights, map_location=device)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise weights_do_not_fit(weights, plan, e) from None
    return network


def weights_do_not_fit(weights: str, plan: SpinePlan, error: Exception) -> PlanMismatch:
    """The error for weights whose strict load failed (no recorded plan said so before)."""
    first = str(error).strip().splitlines()
    return PlanMismatch(f"the weights {weights} do not fit the {plan.network_mode} network of this plan "
                        f"({' '.join(first[:2])[:300]}...): they were built for another plan")


def load_network(plan: SpinePlan, weights: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The plan's network with ``weights`` loaded (:func:`load_weights`), in eval mode."""
    return load_weights(build_network(plan).to(device), weights, plan, device).eval()


def sliding_window_inferer(plan: SpinePlan) -> SlidingWindowInferer:
    """How every stage runs the network over a whole volume ``(B, 1, X, Y, Z)``: MONAI's sliding
    window with the plan's ROI, windows per pass and overlap, gaussian blending, zeros beyond
    the volume. One definition for inference, validation, promotion, scoring and the benchmark,
    so that their outputs are comparable."""
    return SlidingWindowInferer(roi_size=plan.roi_size, sw_batch_size=plan.sw_batch_size, overlap=plan.sw_overlap,
                                mode="gaussian")


def enable_mc_dropout(network: torch.nn.Module) -> torch.nn.Module:
    """Eval mode everywhere except dropout layers, which stay stochastic (Monte-Carlo dropout)."""
    network.eval()
    for module in network.modules():
        if isinstance(module, torch.nn.Dropout | torch.nn.Dropout2d | torch.nn.Dropout3d):
            module.train()
    return network


def select_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked for and present), else CPU."""
    if requested and requested.startswith("cuda") and torch.cuda.is_available():
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() and requested in (None, "", "cuda") else "cpu")
