"""VGG16 with two heads, as used by MAXL and the RL-AUX paper."""
import torch
from torch import nn

# Conv widths per block; each block ends with a 2x2 max-pool (32x32 input -> 1x1).
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_trunk(width: float = 1.0, in_channels: int = 3) -> tuple[nn.Sequential, int]:
    """Conv-BN-ReLU blocks with max-pools, then global pooling; returns (trunk, feature size)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for block in VGG16_BLOCKS:
        for out in block:
            out = max(1, round(out * width))
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        layers.append(nn.MaxPool2d(2))
    # Pooling to 1x1 keeps the heads at 512 inputs for any image size >= 32 (a no-op at 32).
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels


def mlp_head(in_features: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))


class VGG16(nn.Module):
    """A VGG16 trunk shared by a primary head and an auxiliary head; both return logits."""

    def __init__(self, num_primary: int, num_aux: int, width: float = 1.0):
        super().__init__()
        self.trunk, self.feature_dim = vgg16_trunk(width)
        self.primary_head = mlp_head(self.feature_dim, self.feature_dim, num_primary)
        self.aux_head = mlp_head(self.feature_dim, self.feature_dim, num_aux)

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """(primary_logits, aux_logits), plus the trunk features when asked (the shared policy reads them)."""
        features = self.trunk(images)
        logits = (self.primary_head(features), self.aux_head(features))
        return (*logits, features) if return_features else logits
