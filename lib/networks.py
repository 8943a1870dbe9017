"""Network factory: the SwinUNETR that every stage (infer, train, scoring) builds from the plan.

Input  ``(B, 1, X, Y, Z)`` float32, normalised MR intensities, spatial dims multiples of 32.
Output ``(B, NUM_CLASSES, X, Y, Z)`` logits (background + 11 structures).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention

from lib.labels import NUM_CLASSES
from lib.plans import SpinePlan


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


def build_network(plan: SpinePlan) -> torch.nn.Module:
    """A freshly initialised SwinUNETR (no pretrained weights: nothing is downloaded).

    With ``plan.fused_attention`` its window attention is :class:`FusedWindowAttention`
    (same weights, state dicts interchangeable).
    """
    network = SwinUNETR(
        in_channels=1,
        out_channels=NUM_CLASSES,
        feature_size=plan.feature_size,
        depths=tuple(plan.depths),
        drop_rate=plan.dropout,
        spatial_dims=3,
        use_checkpoint=False,
    )
    if plan.fused_attention:
        for module in network.modules():
            if type(module) is WindowAttention:
                module.__class__ = FusedWindowAttention
    return network


def enable_mc_dropout(network: torch.nn.Module) -> torch.nn.Module:
    """Eval mode everywhere except dropout layers, which stay stochastic (Monte-Carlo dropout)."""
    network.eval()
    for module in network.modules():
        if isinstance(module, torch.nn.Dropout | torch.nn.Dropout3d):
            module.train()
    return network


def select_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked for and present), else CPU."""
    if requested and requested.startswith("cuda") and torch.cuda.is_available():
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() and requested in (None, "", "cuda") else "cpu")
