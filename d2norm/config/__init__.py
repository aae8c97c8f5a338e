"""The ``D2NORM`` config keys: defaults (the papers'), validation, world-size rescaling; loading a
YAML config with them."""
from .defaults import (
    RECALIBRATION_REGIMES,
    D2NormConfigError,
    add_d2norm_config,
    scale_norm_iterations,
    validate_d2norm_config,
)
from .loading import load_config

__all__ = ["RECALIBRATION_REGIMES", "D2NormConfigError", "add_d2norm_config", "load_config",
           "scale_norm_iterations", "validate_d2norm_config"]
