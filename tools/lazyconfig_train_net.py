#!/usr/bin/env python3
"""Train and evaluate a detectron2 LazyConfig (``.py``) model with d2norm's normalization layers.

Same flags as detectron2's ``tools/lazyconfig_train_net.py``: ``--config-file x.py``,
``--num-gpus`` (processes; gloo on the CPU when there is no GPU), ``--resume``, ``--eval-only``
and trailing ``key=value`` overrides (``train.max_iter=10 d2norm.CBN.WINDOW=4``). On top of
detectron2's script: the model is built by :func:`d2norm.lazy.build_model` (``d2norm`` settings,
per-level head statistics, head warm-up, conv binding), the d2norm recalibration / freeze-last
hooks run before checkpointing and evaluation, ``train.reference_world_size`` keeps the per-GPU
batch on other GPU counts, and the model is evaluated after recalibration.
"""
from d2norm.engine.third_party_warnings import silence_third_party_warnings

silence_third_party_warnings()  # this process's own: before detectron2's import-time warnings

import logging
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_argument_parser, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm

from d2norm import lazy, recalibrate
from d2norm.engine.evaluation import fast_coco_eval_available
from d2norm.engine.launch import launch
from d2norm.engine.preemption import REQUEUE_EXIT_CODE, CheckpointOnSignal, Preempted, request_requeue

logger = logging.getLogger("d2norm")


def do_test(cfg, model):
    """COCO (or the config's) evaluation on ``dataloader.test``; ``None`` without an evaluator."""
    if "evaluator" not in cfg.dataloader:
        return None
    test_loader = instantiate(cfg.dataloader.test)  # before the evaluator: it may generate the split's files
    evaluator = instantiate(cfg.dataloader.evaluator)
    if isinstance(evaluator, COCOEvaluator) and not fast_coco_eval_available():
        evaluator._use_fast_impl = False
    results = inference_on_dataset(model, test_loader, evaluator)
    print_csv_format(results)
    return results


def ddp_kwargs(cfg, model):
    """``train.ddp`` options; CPU models are wrapped without ``device_ids`` (DDP rejects them)."""
    kwargs = dict(cfg.train.get("ddp", {}))
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return kwargs


def do_train(args, cfg):
    model = lazy.build_model(cfg)
    logger.info(f"Model:\n{model}")
    optimizer = lazy.build_optimizer(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **ddp_kwargs(cfg, model))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}

    def test_and_keep():
        results["last"] = do_test(cfg, model)
        return results["last"]

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        *lazy.build_norm_hooks(cfg, model),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
        CheckpointOnSignal(checkpointer),  # last: SIGTERM/SIGUSR1 -> one checkpoint, exit to be requeued
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except Preempted as stop:
        logging.getLogger("d2norm").warning(f"Preempted: {stop}. Resume with --resume.")
        if comm.is_main_process() and request_requeue():
            logging.getLogger("d2norm").warning("Asked SLURM to requeue the job.")
        sys.exit(REQUEUE_EXIT_CODE)
    return results.get("last")


def setup(args):
    """Config from file and overrides, CPU when there is no GPU, rescaled to the world size."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    lazy.d2norm_node(cfg)  # fail early on a bad d2norm value
    default_setup(cfg, args)
    return lazy.scale_to_world_size(cfg, comm.get_world_size())


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = lazy.build_model(cfg)
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        precise = lazy.d2norm_node(cfg).D2NORM.PRECISE_BN
        if precise.RECALIBRATE_FOR_EVAL_ONLY:
            recalibrate(model, lazy.recalibration_loader(cfg), precise.NUM_ITER)
        return do_test(cfg, create_ddp_model(model))
    return do_train(args, cfg)


def invoke_main():
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
