"""A detectron2 YAML config with the ``D2NORM`` keys, as the command-line tools read it."""
import torch
from detectron2.config import get_cfg

from .defaults import add_d2norm_config, validate_d2norm_config

__all__ = ["load_config"]


def load_config(config_file, opts=(), weights=None, require_weights=False):
    """``config_file`` merged with ``opts`` (``KEY VALUE`` pairs), ``MODEL.WEIGHTS`` replaced by
    ``weights`` when given, the CPU when the config asks for CUDA on a machine without it, the
    ``D2NORM`` keys validated; frozen.

    Raises:
        ValueError: ``require_weights`` and the result has no ``MODEL.WEIGHTS``.
    """
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    if weights:
        cfg.MODEL.WEIGHTS = str(weights)
    if require_weights and not cfg.MODEL.WEIGHTS:
        raise ValueError(f"{config_file} has no MODEL.WEIGHTS: pass --weights (e.g. output/demo/model_final.pth)")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    validate_d2norm_config(cfg)
    cfg.freeze()
    return cfg
