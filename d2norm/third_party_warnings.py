"""Warnings that detectron2 v0.6 and fvcore trigger inside torch 2.x on every run, silenced once.

Each is about third-party code a d2norm user cannot change, and repeats in every process:

* ``torch.jit.script`` deprecation (FutureWarning): fvcore's ``focal_loss`` and detectron2's
  ``box_regression`` script functions at import time;
* ``torch.meshgrid`` without ``indexing`` (UserWarning): detectron2's anchor generator.

The filters match these messages only; every other warning is shown as usual. They are installed
by ``import d2norm``, which must therefore come before the first detectron2 import.
"""
import warnings

__all__ = ["silence_third_party_warnings"]

_FILTERS = (
    (r"`torch\.jit\.script` is deprecated", FutureWarning),
    (r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument", UserWarning),
)


def silence_third_party_warnings():
    """Install the filters (idempotent: ``warnings.filterwarnings`` drops an identical earlier entry)."""
    for message, category in _FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)
