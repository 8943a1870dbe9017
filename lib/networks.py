"""Network factory: the SwinUNETR that every stage (infer, train, scoring) builds from the plan.

Input  ``(B, 1, X, Y, Z)`` float32, normalised MR intensities, spatial dims multiples of 32.
Output ``(B, NUM_CLASSES, X, Y, Z)`` logits (background + 11 structures).
"""

from __future__ import annotations

import torch
from monai.networks.nets import SwinUNETR

from lib.labels import NUM_CLASSES
from lib.plans import SpinePlan


def build_network(plan: SpinePlan) -> torch.nn.Module:
    """A freshly initialised SwinUNETR (no pretrained weights: nothing is downloaded)."""
    return SwinUNETR(
        in_channels=1,
        out_channels=NUM_CLASSES,
        feature_size=plan.feature_size,
        depths=tuple(plan.depths),
        drop_rate=plan.dropout,
        spatial_dims=3,
        use_checkpoint=False,
    )


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
