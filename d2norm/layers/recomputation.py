"""Refuse activation checkpointing around the stateful d2norm layers.

``torch.utils.checkpoint`` runs a region's forward again during the backward. A layer with
cross-iteration state (CBN's window, MABN's moving averages) cannot be run twice for one iteration:
the non-reentrant variant would advance its state a second time, the reentrant one (whose first
forward runs without autograd) would return a gradient of a different forward than the one whose
output was used. The recomputation is recognised by running inside an autograd backward.
"""
from .._compat import inside_autograd_backward

__all__ = ["refuse_recomputation"]


def refuse_recomputation(layer):
    """Raise if ``layer``'s stateful training forward is being run by an autograd backward."""
    if inside_autograd_backward():
        raise RuntimeError(
            f"{type(layer).__name__} was run inside a backward pass, i.e. recomputed by activation "
            "checkpointing (torch.utils.checkpoint): its cross-iteration state would advance twice or "
            "its gradient would come from another forward. Keep d2norm's CBN/MABN layers outside "
            "checkpointed regions (checkpoint the blocks between them), or use PreciseBN/BN there."
        )
