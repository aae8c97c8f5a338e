"""What the benchmarked models have in common: the CBN floor variant, warm-up skipping, window state size."""
import torch
import torch.nn as nn
from torch.nn.grad import conv2d_weight

from d2norm.layers import NormLayer
from d2norm.modeling.binding import conv_norm_pairs

from .measure import tensor_bytes

FLOOR = "CBN floor"  # BN + one more conv weight-gradient per norm-fed conv


def window_state_bytes(model):
    """Bytes of the cross-iteration state: CBN history buffers, MABN ring buffers, official lists."""
    total = 0
    for m in model.modules():
        if isinstance(m, NormLayer):
            total += tensor_bytes(m.cross_iteration_buffers().values())
        elif hasattr(m, "window_state_bytes"):  # OfficialStyleCrossIterationBN's lists
            total += m.window_state_bytes()
    return total


def skip_warmup(model):
    """Advance every d2norm layer's schedule past burn-in / warm-up, so the next steps run the
    steady-state algorithm (MABN's moving averages and clipped renorm factor; its schedule is
    evaluated on the device, so step cost does not depend on the phase)."""
    for m in model.modules():
        if isinstance(m, NormLayer):
            m.skip_warmup()


def _weight_gradient_of_output(conv, args, output):
    """The extra work CBN cannot avoid: d var/dW needs a weight-gradient pass of the conv with its
    own output as ``grad_output`` (CBN paper, Sec. 3.3; see ``conv_statistic_gradients``)."""
    if conv.training and torch.is_grad_enabled():
        with torch.no_grad():
            conv2d_weight(args[0], conv.weight.shape, output, conv.stride, conv.padding, conv.dilation, conv.groups)


def add_cbn_floor(model, example_inputs=None):
    """Give every conv that feeds a BatchNorm of ``model`` the weight-gradient pass CBN adds (in place)."""
    pairs = conv_norm_pairs(model, example_inputs, norm_types=(nn.BatchNorm2d,))
    for conv, _ in pairs:
        conv.register_forward_hook(_weight_gradient_of_output)
    return model
