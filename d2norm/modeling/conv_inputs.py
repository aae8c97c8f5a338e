"""Which conv feeds each d2norm layer, observed on a forward pass (tensor identity).

CBN's Taylor compensation (CBN Eq. 6-7) needs the weight and input of the conv whose output the
layer normalises; MABN wants that conv weight-centralised (MABN §4.3); folding needs a conv whose
output reaches the layer unchanged. Detectron2 never hands a norm its conv, and models keep them in
many shapes (``Conv2d(norm=...)``, ``nn.Sequential`` towers, RegNet's ``conv``/``bn`` attributes,
ViT's bottleneck blocks, ``SimpleFeaturePyramid``'s transposed convs, user modules). So instead of
matching module layouts, :func:`find_norm_inputs` runs one forward under ``torch.no_grad`` in eval
mode and records, for every tensor an operation returns, the operation, the module it ran in and the
tensor's version counter. A layer is *fed directly* by a conv when its input **is** the output
tensor of that conv module's ``conv2d`` (same object, not modified in place since) and the conv has
not run again in between. Anything else — an activation, a sum, a transposed conv, a functional
conv outside a module — is reported with the operation that produced the input.
"""
import contextlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..layers import NormLayer

__all__ = ["NormInput", "default_example_inputs", "find_norm_inputs"]

# Operation names (``func.__name__``) of the convolutions d2norm recognises.
CONV2D = "conv2d"
CONV_TRANSPOSE2D = "conv_transpose2d"


@dataclass
class NormInput:
    """What feeds one d2norm layer (``norm``, at module path ``name``) in the observed forward.

    ``conv`` is set when every call of the layer received the fresh output of that conv module's
    ``kind`` operation (``"conv2d"`` or ``"conv_transpose2d"``); otherwise ``reason`` says what the
    input was instead. ``exclusive`` is True when that conv's outputs went to this layer only (no
    other layer, no other operation), which folding needs.
    """

    name: str
    norm: nn.Module
    conv: nn.Module | None = None
    conv_name: str = ""
    kind: str = ""
    reason: str = ""
    exclusive: bool = False
    _calls: list[tuple] = field(default_factory=list, repr=False)

    @property
    def fed_by_conv2d(self):
        """Fed directly by an ``nn.Conv2d`` module (CBN can bind, the layer can fold)."""
        return self.kind == CONV2D and isinstance(self.conv, nn.Conv2d)


@dataclass
class _Produced:
    tensor: weakref.ref
    version: int
    op: str
    module: str  # where it ran, for messages
    conv: nn.Module | None
    conv_call: int


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _version(tensor):
    try:
        return tensor._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return -1


class _Recorder(TorchFunctionMode):
    """Records the producer of every tensor, the module stack, and uses of conv outputs."""

    def __init__(self, names):
        super().__init__()
        self.names = names  # id(module) -> path
        self.stack = []  # modules whose forward is running, innermost last
        self.produced = {}  # id(tensor) -> _Produced
        self.conv_calls = {}  # id(conv module) -> number of conv operations it ran
        self.norm_depth = 0  # > 0 inside a d2norm layer's forward
        self.used_elsewhere = set()  # id(conv module) whose output an op outside the layers used

    def lookup(self, tensor):
        rec = self.produced.get(id(tensor))
        if rec is None or rec.tensor() is not tensor:
            return None
        return rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(True for _ in _tensors(out)):
            return out  # metadata (.shape, .dim(), ._version): neither a use nor a producer
        if self.norm_depth == 0:
            for t in _tensors((args, kwargs)):
                rec = self.lookup(t)
                if rec is not None and rec.conv is not None and rec.version == _version(t):
                    self.used_elsewhere.add(id(rec.conv))
        op = getattr(func, "__name__", str(func))
        module = self.stack[-1] if self.stack else None
        conv = module if op in (CONV2D, CONV_TRANSPOSE2D) and isinstance(module, nn.modules.conv._ConvNd) else None
        if conv is not None:
            self.conv_calls[id(conv)] = self.conv_calls.get(id(conv), 0) + 1
        for t in _tensors(out):
            version, rec = _version(t), self.lookup(t)
            if rec is not None and rec.version == version:
                continue  # the same tensor handed back unchanged (e.g. .contiguous())
            self.produced[id(t)] = _Produced(
                weakref.ref(t), version, op, self._where(module),
                conv, self.conv_calls.get(id(conv), 0) if conv is not None else 0,
            )
        return out

    def _where(self, module):
        if module is None:
            return "outside any module"
        name = self.names.get(id(module), "")
        return f"in '{name}'" if name else f"in the top-level {type(module).__name__}"

    def describe(self, x):
        """``(conv, kind, reason)`` for a layer input ``x``."""
        rec = self.lookup(x)
        if rec is None:
            return None, "", "its input is not computed inside the model (a model input)"
        where = rec.module
        if rec.version != _version(x) or (rec.op.endswith("_") and not rec.op.startswith("__")):
            return None, "", f"its input was modified in place by `{rec.op}` {where} (e.g. an in-place activation)"
        if rec.op not in (CONV2D, CONV_TRANSPOSE2D):
            return None, "", f"its input is the output of `{rec.op}` {where}, not of a conv"
        if rec.conv is None:
            return None, "", f"its input is a functional `{rec.op}` {where}, not a conv module"
        if rec.conv_call != self.conv_calls[id(rec.conv)]:
            return None, "", f"its conv ran again {where} before the layer used its output"
        return rec.conv, rec.op, ""


def default_example_inputs(model):
    """A one-image batch for a detectron2 meta-architecture (``backbone`` + ``pixel_mean``), else None.

    The image is black, as large as the backbone's size divisibility (at least 64 pixels); the
    model pads it as it pads any image (``square_size`` for ViT's ``SimpleFeaturePyramid``).
    """
    backbone = getattr(model, "backbone", None)
    pixel_mean = getattr(model, "pixel_mean", None)
    if not isinstance(backbone, nn.Module) or not isinstance(pixel_mean, torch.Tensor):
        return None
    size = max(64, int(getattr(backbone, "size_divisibility", 0) or 0))
    image = torch.zeros(pixel_mean.numel(), size, size, device=pixel_mean.device)
    return ([{"image": image, "height": size, "width": size}],)


def _run_example(model, args, kwargs=None):
    """``model(*args, **kwargs)`` in eval mode without gradients, then every module's mode restored.
    Layers without population statistics yet (PreciseBN) run on placeholders: only the data flow
    matters here."""
    modes = [(m, m.training) for m in model.modules()]
    with contextlib.ExitStack() as placeholders:
        for m in model.modules():
            if isinstance(m, NormLayer):
                placeholders.enter_context(m.placeholder_statistics())
        try:
            model.eval()
            with torch.no_grad():
                model(*args, **(kwargs or {}))
        finally:
            for m, training in modes:
                m.training = training


def find_norm_inputs(model, example_inputs=None, example_kwargs=None, norm_types=(NormLayer,)):
    """Observe one forward of ``model`` and say what feeds each layer of ``norm_types``.

    Args:
        model (nn.Module): the model (not DDP-wrapped).
        example_inputs (tuple or None): positional arguments of one forward (a single tensor is
            taken as the only argument). Default: a black image for a detectron2
            meta-architecture (:func:`default_example_inputs`).
        example_kwargs (dict or None): keyword arguments of that forward.

    Returns:
        list[NormInput], one per layer of ``norm_types`` in ``model.named_modules()`` order
        (the per-level layers of a ``PerLevelNorm`` included).

    Raises:
        ValueError: no ``example_inputs`` and the model is not a detectron2 meta-architecture.
    """
    default = example_inputs is None
    if default:
        example_inputs = default_example_inputs(model)
        if example_inputs is None:
            raise ValueError(
                f"{type(model).__name__} is not a detectron2 meta-architecture: pass example_inputs, "
                "a tuple of positional arguments for one forward, to find the conv feeding each norm"
            )
    elif not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    names = {id(m): name for name, m in model.named_modules()}
    inputs = {id(m): NormInput(name, m) for name, m in model.named_modules() if isinstance(m, norm_types)}
    recorder = _Recorder(names)

    def enter(module, args):
        if id(module) in inputs and args:
            inputs[id(module)]._calls.append(recorder.describe(args[0]))
        if isinstance(module, NormLayer):
            recorder.norm_depth += 1
        recorder.stack.append(module)

    def leave(module, args, output):
        recorder.stack.pop()
        if isinstance(module, NormLayer):
            recorder.norm_depth -= 1

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave, always_call=True))
    try:
        with recorder:
            _run_example(model, example_inputs, example_kwargs)
    except Exception as e:
        if not default:
            raise
        # Once every norm has run, a later failure (e.g. detectron2's NMS in a float64 model) is irrelevant.
        if not all(item._calls for item in inputs.values()):
            raise RuntimeError(
                f"d2norm observes one forward of {type(model).__name__} on a black image to find the conv "
                f"feeding each norm, and it failed ({type(e).__name__}: {e}); pass example_inputs instead"
            ) from e
    finally:
        for h in handles:
            h.remove()
    feeds_per_conv = {}
    for item in inputs.values():
        for conv, _, _ in item._calls:
            if conv is not None:
                feeds_per_conv.setdefault(id(conv), set()).add(id(item.norm))
    for item in inputs.values():
        _summarise(item, names, recorder, feeds_per_conv)
    return list(inputs.values())


def _summarise(item, names, recorder, feeds_per_conv):
    calls = item._calls
    if not calls:
        item.reason = "it did not run in the observed forward"
        return
    failed = next((reason for conv, _, reason in calls if conv is None), None)
    if failed is not None:
        item.reason = failed
        return
    convs = {id(conv): (conv, kind) for conv, kind, _ in calls}
    if len(convs) > 1:
        item.reason = "different convs feed it in different calls: " + ", ".join(
            f"'{names[i]}'" for i in convs)
        return
    (conv, kind), = convs.values()
    item.conv, item.conv_name, item.kind = conv, names[id(conv)], kind
    item.exclusive = (
        feeds_per_conv[id(conv)] == {id(item.norm)}
        and id(conv) not in recorder.used_elsewhere
        and recorder.conv_calls[id(conv)] == len(calls)
    )
