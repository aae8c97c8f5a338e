"""Putting a new module in the place of another inside a model, wherever the model registers it."""
import torch.nn as nn

__all__ = ["replace_module"]


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Register ``new`` under every parent and name that register ``old`` in ``root``.

    A module registered twice (the same conv shared by two parents) is replaced in both. Returns
    the root: ``new`` if ``old`` is ``root`` itself, else ``root``.

    Raises:
        ValueError: ``old`` is not in ``root``.
    """
    if old is root:
        return new
    places = [(parent, key) for parent in root.modules() for key, child in parent._modules.items() if child is old]
    if not places:
        raise ValueError(f"{type(old).__name__} module to replace is not a submodule of the {type(root).__name__}")
    for parent, key in places:
        parent._modules[key] = new
    return root
