"""Warnings that detectron2 v0.6 and fvcore trigger inside torch 2.x on every run, silenced once.

Each is about third-party code a d2norm user cannot change, and repeats in every process:

* ``torch.jit.script`` deprecation (FutureWarning): fvcore's ``focal_loss`` and detectron2's
  ``box_regression`` script functions at import time;
* ``torch.meshgrid`` without ``indexing`` (UserWarning): detectron2's anchor generator;
* "No CUDA runtime is found, using CUDA_HOME=..." (a torch log record): detectron2's
  ``collect_env`` imports ``torch.utils.cpp_extension`` on machines without CUDA.

The filters match these messages only; every other warning and log record is shown as usual. They are
process-wide, so the library never installs them: d2norm's own entry points (``tools/train_net.py``,
``tools/lazyconfig_train_net.py``, ``tools/predict.py``) call :func:`silence_third_party_warnings`
first, before detectron2 is imported. Importing this module imports nothing else of d2norm.
"""
import logging
import warnings

__all__ = ["silence_third_party_warnings"]

_FILTERS = (
    (r"`torch\.jit\.script` is deprecated", FutureWarning),
    (r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument", UserWarning),
)


def _not_the_cuda_home_notice(record):
    return not record.getMessage().startswith("No CUDA runtime is found")


def silence_third_party_warnings():
    """Install the filters (idempotent: ``warnings.filterwarnings`` drops an identical earlier entry)."""
    for message, category in _FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)
    cpp_extension_logger = logging.getLogger("torch.utils.cpp_extension")
    if _not_the_cuda_home_notice not in cpp_extension_logger.filters:
        cpp_extension_logger.addFilter(_not_the_cuda_home_notice)
