"""The agent's policy: a backbone, one linear head per action, and a value head."""
from __future__ import annotations

import torch
from torch import nn

from ..models import vgg16_trunk

WEIGHT_BINS = 21  # weight-aware RL-AUX: bin b in 0..20 scales the auxiliary loss by 2^(8b/20 - 3)
UNIT_INIT_SPREAD = 2.0  # --weight-init unit: std (in bins) of the starting distribution around factor 1


def weight_factor(bins: torch.Tensor, num_bins: int = WEIGHT_BINS) -> torch.Tensor:
    """Bin 0 -> 1/8, bin num_bins-1 -> 32: 2^(8w - 3) with w = bin / (num_bins - 1)."""
    w = bins.float() / (num_bins - 1)
    return torch.exp2(8.0 * w - 3.0)


class Policy(nn.Module):
    """Maps an observation to the logits of every action head (side by side) and a value.

    backbone "vgg16" (the paper's): its own VGG16 over the image, then a 256-wide feature layer.
    backbone "shared": the primary network's detached features, then the same 256-wide layer.
    weight_init "uniform" starts the weight head uniform over its bins; "unit" starts it as a discretised
    normal around factor 1 (2^0, between bins 7 and 8 of 21), UNIT_INIT_SPREAD bins wide.
    """

    def __init__(self, backbone: str, num_aux: int, weight_bins: int = 0, in_features: int | None = None,
                 width: float = 1.0, hidden: int = 256, weight_init: str = "uniform"):
        super().__init__()
        if backbone == "vgg16":
            self.backbone, in_features = vgg16_trunk(width)
        elif backbone == "shared":
            if in_features is None:
                raise ValueError("the shared backbone needs in_features (the primary network's feature size)")
            self.backbone = nn.Identity()
        else:
            raise ValueError(f"unknown policy backbone {backbone!r}")
        self.feature = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True))
        self.head_sizes = (num_aux, weight_bins) if weight_bins else (num_aux,)
        self.action_heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.head_sizes)
        self.value_head = nn.Linear(hidden, 1)
        # Small initial action logits: the agent starts close to uniform inside each block (as in CleanRL).
        for head in self.action_heads:
            nn.init.orthogonal_(head.weight, gain=0.01)
            nn.init.zeros_(head.bias)
        if weight_init not in ("uniform", "unit"):
            raise ValueError(f"unknown weight_init {weight_init!r}")
        if weight_bins and weight_init == "unit":
            bins = torch.arange(weight_bins, dtype=torch.float32)
            centre = 3 / 8 * (weight_bins - 1)  # 2^(8w - 3) = 1 at w = 3/8
            with torch.no_grad():
                self.action_heads[1].bias.copy_(-(bins - centre) ** 2 / (2 * UNIT_INIT_SPREAD ** 2))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.feature(self.backbone(obs))
        logits = torch.cat([head(h) for head in self.action_heads], dim=1)
        return logits, self.value_head(h).squeeze(1)
