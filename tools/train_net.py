#!/usr/bin/env python3
"""Train and evaluate a detectron2 model with d2norm's normalization layers.

Same flags as detectron2's ``tools/train_net.py``: ``--config-file``, ``--num-gpus`` (processes;
gloo on CPU when there is no GPU), ``--resume``, ``--eval-only`` and trailing ``KEY VALUE`` overrides.
"""
from d2norm.engine.third_party_warnings import silence_third_party_warnings

silence_third_party_warnings()  # this process's own: before detectron2's import-time warnings

import contextlib
import json
import logging
import os
import sys
import weakref

import torch
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2norm import recalibrate
from d2norm.config import load_config, scale_norm_iterations
from d2norm.engine.checkpoint import Checkpointer
from d2norm.engine.cpu_threads import set_default_cpu_threads
from d2norm.engine.evaluation import fast_coco_eval_available
from d2norm.engine.hooks import build_norm_hooks, recalibration_loader
from d2norm.engine.launch import cpu_ddp_compatible, launch
from d2norm.engine.nonfinite_report import ReportNonFiniteSkips
from d2norm.engine.output_lock import output_dir_lock
from d2norm.engine.preemption import REQUEUE_EXIT_CODE, CheckpointOnSignal, Preempted, request_requeue
from d2norm.engine.solver import build_optimizer
from d2norm.modeling.build import build_model


class Trainer(DefaultTrainer):
    """DefaultTrainer with d2norm's model building, optimizer groups, norm hooks, checkpointer
    (errors naming the file, resume fallback) and complete resume state on detectron2 v0.6."""

    # detectron2 main's DefaultTrainer checkpoints its inner trainer (optimizer, AMP grad scaler)
    # under "_trainer"; v0.6's saves only the iteration and the hooks (LR scheduler).
    _SAVES_INNER_TRAINER = DefaultTrainer.state_dict is not TrainerBase.state_dict

    def __init__(self, cfg):
        cfg = scale_norm_iterations(cfg, comm.get_world_size())
        with cpu_ddp_compatible():
            super().__init__(cfg)

    def state_dict(self):
        state = super().state_dict()
        if not self._SAVES_INNER_TRAINER:
            state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not self._SAVES_INNER_TRAINER and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

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
        """detectron2's hooks with its PreciseBN replaced by d2norm's, placed before checkpointing.

        Also swaps in d2norm's checkpointer first (``DefaultTrainer.__init__`` has just built
        detectron2's), so that the periodic checkpointer hook and ``resume_or_load`` use it.
        """
        self.checkpointer = Checkpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        hook_list = [h for h in super().build_hooks() if not isinstance(h, hooks.PreciseBN)]
        norm_hooks = build_norm_hooks(self.cfg, self.model, self.build_train_loader)
        first_after = next(
            (i for i, h in enumerate(hook_list) if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))),
            len(hook_list),
        )
        norm_hooks.append(ReportNonFiniteSkips(self.model))
        # Last, so that a preemption checkpoint follows everything the other hooks did in the iteration.
        return hook_list[:first_after] + norm_hooks + hook_list[first_after:] + [CheckpointOnSignal(self.checkpointer)]


def setup(args):
    """:func:`d2norm.config.load_config`, then detectron2's and d2norm's logging and config dump in OUTPUT_DIR."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2norm")
    logger = logging.getLogger("d2norm")
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("No CUDA device: training and evaluating on the CPU")
        set_default_cpu_threads(cfg, comm.get_local_size())
    if comm.get_world_size() > 1:
        logger.info(f"Distributed backend: {torch.distributed.get_backend()}")
    return cfg


def save_evaluation(cfg, results):
    """Write the evaluation results to ``OUTPUT_DIR/evaluation.json`` (main process only)."""
    if results and comm.is_main_process():
        with open(os.path.join(cfg.OUTPUT_DIR, "evaluation.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def evaluate(cfg, args):
    """``--eval-only``: load ``MODEL.WEIGHTS``, recalibrate the norms if
    ``D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY``, evaluate."""
    model = Trainer.build_model(cfg)
    Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    if cfg.D2NORM.PRECISE_BN.RECALIBRATE_FOR_EVAL_ONLY:
        recalibrate(model, recalibration_loader(cfg, Trainer.build_train_loader), cfg.D2NORM.PRECISE_BN.NUM_ITER)
    res = Trainer.test(cfg, model)
    verify_results(cfg, res)
    return res


def main(args):
    if args.eval_only:
        cfg = setup(args)
        return save_evaluation(cfg, evaluate(cfg, args))
    # One training per OUTPUT_DIR, locked before anything is written there (rank 0 writes).
    output_dir = load_config(args.config_file, args.opts).OUTPUT_DIR
    with output_dir_lock(output_dir) if comm.is_main_process() else contextlib.nullcontext():
        cfg = setup(args)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        try:
            trainer.train()
        except Preempted as stop:
            logging.getLogger("d2norm").warning(f"Preempted: {stop}. Resume with --resume.")
            if comm.is_main_process() and request_requeue():
                logging.getLogger("d2norm").warning("Asked SLURM to requeue the job.")
            sys.exit(REQUEUE_EXIT_CODE)
    return save_evaluation(cfg, getattr(trainer, "_last_eval_results", None))  # set by the final evaluation


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    setup_logger(name="d2norm.engine.launch", abbrev_name="d2norm")  # the launcher's own log line (CPU/gloo)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    invoke_main()
