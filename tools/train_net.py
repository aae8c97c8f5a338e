#!/usr/bin/env python3
"""Train and evaluate a detectron2 model with d2norm's normalization layers.

Same flags as detectron2's ``tools/train_net.py``: ``--config-file``, ``--num-gpus`` (processes;
gloo on CPU when there is no GPU), ``--resume``, ``--eval-only`` and trailing ``KEY VALUE`` overrides.
"""
import logging
import os

import d2norm  # noqa: F401  (first: registers CBN/MABN/PreciseBN in every get_norm importer, also in spawned workers, and silences detectron2's import-time warnings)
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2norm import add_d2norm_config, validate_d2norm_config
from d2norm.config import scale_norm_iterations
from d2norm.cpu_threads import set_default_cpu_threads
from d2norm.distributed import cpu_ddp_compatible, launch
from d2norm.hooks import build_norm_hooks
from d2norm.modeling import build_model
from d2norm.solver import build_optimizer


def fast_coco_eval_available():
    """Whether detectron2's compiled COCO evaluator exists (not in the pure-Python v0.6 install)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_D2NORM_STUB", False)


class Trainer(DefaultTrainer):
    """DefaultTrainer with d2norm's model building, optimizer groups and norm hooks."""

    def __init__(self, cfg):
        cfg = scale_norm_iterations(cfg, comm.get_world_size())
        with cpu_ddp_compatible():
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        return build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=fast_coco_eval_available())

    def build_hooks(self):
        """detectron2's hooks with its PreciseBN replaced by d2norm's, placed before checkpointing."""
        hook_list = [h for h in super().build_hooks() if not isinstance(h, hooks.PreciseBN)]
        norm_hooks = build_norm_hooks(self.cfg, self.model, self.build_train_loader)
        first_after = next(
            (i for i, h in enumerate(hook_list) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))),
            len(hook_list),
        )
        return hook_list[:first_after] + norm_hooks + hook_list[first_after:]


def setup(args):
    """Config from file and overrides, D2NORM validated, CPU when there is no GPU."""
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    validate_d2norm_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2norm")
    logger = logging.getLogger("d2norm")
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("No CUDA device: training and evaluating on the CPU")
        set_default_cpu_threads(cfg, comm.get_local_size())
    if comm.get_world_size() > 1:
        logger.info(f"Distributed backend: {torch.distributed.get_backend()}")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    return getattr(trainer, "_last_eval_results", None)  # set by the final evaluation, if any


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    setup_logger(name="d2norm.distributed", abbrev_name="d2norm")  # the launcher's own log line (CPU/gloo)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
