"""The learnable per-channel affine (γ, β) shared by the d2norm layers that are not BatchNorm2d."""
import torch
import torch.nn as nn


def register_affine(module: nn.Module, num_features: int, affine: bool) -> None:
    """Give ``module`` Parameters ``weight`` = 1 and ``bias`` = 0 of length ``num_features``, or ``None``s."""
    if affine:
        module.weight = nn.Parameter(torch.ones(num_features))
        module.bias = nn.Parameter(torch.zeros(num_features))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)
