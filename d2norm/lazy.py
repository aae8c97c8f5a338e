"""d2norm for detectron2's LazyConfig (Python configs): what a YAML user gets, from a ``.py`` config.

A LazyConfig file holds ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier`` and ``train``
(detectron2's ``configs/common``); d2norm adds one node, ``d2norm``, with exactly the keys and
defaults of the YAML ``D2NORM`` node::

    from d2norm.lazy import get_d2norm_config
    d2norm = get_d2norm_config()
    d2norm.CBN.WINDOW = 4

and the functions below do what ``tools/train_net.py`` does for YAML:

* :func:`build_model`: instantiate ``cfg.model`` with the ``d2norm`` layer settings (MABN's head
  warm-up in ``roi_heads``/``head``), then the same post-build pass as YAML
  (:func:`d2norm.modeling.finish_model`: per-level RetinaNet/FCOS head statistics, conv binding /
  weight centralisation);
* :func:`build_optimizer`: ``cfg.optimizer`` with its ``params.model`` set; use
  :func:`d2norm.engine.solver.get_optimizer_param_groups` as ``params`` so every d2norm layer counts as a
  norm for ``weight_decay_norm``;
* :func:`build_norm_hooks`: recalibration (PreciseBN) and freeze-last hooks;
* :func:`scale_to_world_size`: ``train.reference_world_size``, detectron2's
  ``SOLVER.REFERENCE_WORLD_SIZE`` convention (keep the per-GPU batch on another GPU count).
"""
import copy

import torch
from detectron2.config import CfgNode, instantiate
from omegaconf import OmegaConf

from .config.defaults import (
    D2NormConfigError,
    add_d2norm_config,
    scale_norm_iterations,
    validate_d2norm_config,
)
from .engine.hooks import norm_hooks
from .modeling.build import configured_lazy_norms, finish_model

__all__ = [
    "build_model",
    "build_norm_hooks",
    "build_optimizer",
    "d2norm_node",
    "get_d2norm_config",
    "recalibration_loader",
    "scale_to_world_size",
]


def _defaults():
    root = CfgNode()
    add_d2norm_config(root)
    return root


def get_d2norm_config():
    """The ``D2NORM`` defaults as an OmegaConf node for a LazyConfig file (``d2norm = ...``); the
    keys are those of the YAML node (``CBN.WINDOW``, ``MABN.BUFFER_SIZE``, ``PRECISE_BN.ENABLED``, …)."""
    return OmegaConf.create(_to_dict(_defaults().D2NORM))


def _to_dict(node):
    return {k: _to_dict(v) if isinstance(v, CfgNode) else v for k, v in node.items()}


def d2norm_node(cfg):
    """``cfg.d2norm`` (defaults where absent) as a validated detectron2 config root with a ``D2NORM`` node.

    Raises:
        D2NormConfigError: an unknown key or a bad value; the message names ``cfg.d2norm.<key>``.
    """
    root = _defaults()
    lazy = cfg.get("d2norm")
    try:
        if lazy is not None:
            root.D2NORM.merge_from_other_cfg(CfgNode(OmegaConf.to_container(lazy, resolve=True)))
        validate_d2norm_config(root)
    except (KeyError, ValueError) as e:  # unknown key, type mismatch, out of range
        message = str(e.args[0] if isinstance(e, KeyError) else e).replace("cfg.D2NORM.", "cfg.d2norm.")
        raise D2NormConfigError(f"LazyConfig node 'd2norm': {message} (keys and values as YAML's D2NORM)") from None
    return root


def _optimizer_node(optimizer_cfg):
    """The node holding ``params`` and ``lr`` (below any wrappers such as ``clip_full_model_gradients``)."""
    node = optimizer_cfg
    while "params" not in node and "optimizer" in node:
        node = node.optimizer
    return node


def scale_to_world_size(cfg, world_size):
    """Rescale ``cfg`` (in place) from ``train.reference_world_size`` GPUs to ``world_size``.

    As detectron2's ``auto_scale_workers`` does for ``SOLVER.REFERENCE_WORLD_SIZE``: the batch per
    GPU stays, so the total batch and the learning rate scale by ``world_size / reference`` and
    ``max_iter``, ``eval_period`` and the checkpoint period by the inverse (``lr_multiplier`` works
    in fractions of ``max_iter``); d2norm's iteration counts follow
    (:func:`d2norm.config.defaults.scale_norm_iterations`). A reference of 0 (or absent) keeps ``cfg``.
    """
    reference = cfg.train.get("reference_world_size", 0)
    if not reference or reference == world_size:
        return cfg
    scale = world_size / reference
    cfg.dataloader.train.total_batch_size = int(round(cfg.dataloader.train.total_batch_size * scale))
    optimizer = _optimizer_node(cfg.optimizer)
    optimizer.lr = optimizer.lr * scale
    cfg.train.max_iter = int(round(cfg.train.max_iter / scale))
    cfg.train.eval_period = int(round(cfg.train.eval_period / scale))
    cfg.train.checkpointer.period = int(round(cfg.train.checkpointer.period / scale))
    root = d2norm_node(cfg)
    root.SOLVER = CfgNode({"REFERENCE_WORLD_SIZE": reference})
    scaled = scale_norm_iterations(root, world_size)
    cfg.d2norm = OmegaConf.create(_to_dict(scaled.D2NORM))
    cfg.train.reference_world_size = world_size
    return cfg


def build_model(cfg, example_inputs=None):
    """``cfg.model`` built with the ``cfg.d2norm`` layer settings
    (:func:`d2norm.modeling.build.configured_lazy_norms`) on ``cfg.train.device`` (the CPU when CUDA
    is absent), then :func:`d2norm.modeling.finish_model`.

    Args:
        cfg: a LazyConfig with ``model``, ``train.device`` and optionally ``d2norm``.
        example_inputs (tuple or None): one forward's arguments, for a model that is not a
            detectron2 meta-architecture (see :func:`d2norm.prepare_model`).
    """
    root = d2norm_node(cfg)
    model = instantiate(configured_lazy_norms(cfg.model, root.D2NORM))
    device = cfg.train.get("device", "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    model.to(device)
    return finish_model(model, root.D2NORM, example_inputs)


def build_optimizer(cfg, model):
    """``cfg.optimizer`` instantiated for ``model`` (sets ``params.model``, as detectron2's
    ``lazyconfig_train_net.py`` does, also below ``clip_full_model_gradients``)."""
    _optimizer_node(cfg.optimizer).params.model = model
    return instantiate(cfg.optimizer)


def build_norm_hooks(cfg, model):
    """d2norm's recalibration and freeze-last hooks for ``cfg.d2norm`` (possibly none).

    Recalibration batches come from ``cfg.dataloader.train`` with ``num_workers=0`` (as detectron2's
    PreciseBN hook); recalibration runs before each evaluation (``train.eval_period``) and at the end.
    """

    return norm_hooks(d2norm_node(cfg).D2NORM, cfg.train.eval_period, model, lambda: recalibration_loader(cfg))


def recalibration_loader(cfg):
    """``cfg.dataloader.train`` with ``num_workers=0``, as detectron2 builds it for PreciseBN."""
    loader_cfg = copy.deepcopy(cfg.dataloader.train)
    if "num_workers" in loader_cfg:
        loader_cfg.num_workers = 0
    return instantiate(loader_cfg)
