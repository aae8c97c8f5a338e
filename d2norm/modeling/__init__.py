"""The detectron2 integration of the layers: norm names in ``get_norm``, the post-build pass
(binding, per-level head statistics), folding into convs."""
from .binding import prepare_model
from .build import build_model, configured_norms
from .fold import fold_norms
from .registry import get_norm, known_norm_names, register_norm

__all__ = ["build_model", "configured_norms", "fold_norms", "get_norm", "known_norm_names", "prepare_model",
           "register_norm"]
