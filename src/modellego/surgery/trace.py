"""fx tracing for the channel graph: a tracer that keeps norm layers whole, shape
propagation that keeps the sizes a model computes, the tables of ops by what they do to
channels, and the evaluation of a node's arguments (see :mod:`.graph`)."""

from __future__ import annotations

import math
import operator
import threading
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError
from ..models.attention import HeadAttention

TRACE_LOCK = threading.Lock()

# Modules and functions that act on every element alone: the output has the input's
# channels in the input's places (``Softmax`` on the logits is kept as before).
ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
                        nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                        nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
                        nn.Dropout2d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax)
# Modules that work on the spatial dims of an (N, C, H, W) map, channel by channel.
SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                    nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample, nn.UpsamplingNearest2d,
                    nn.UpsamplingBilinear2d)
# Modules that only move elements around: replayed on the channel index.
SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
ELEMENTWISE_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout,
    F.dropout2d, F.alpha_dropout, F.softmax, F.log_softmax, torch.relu, torch.sigmoid,
    torch.tanh, torch.softmax, torch.exp, torch.erf, torch.abs, torch.sqrt, torch.rsqrt,
    torch.clamp, torch.clip, torch.square, torch.pow, torch.neg, torch.maximum, torch.minimum,
    torch.add, torch.sub, torch.mul, torch.div, torch.addcmul, torch.addcdiv, operator.add,
    operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv,
    operator.pow, operator.neg}
ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "erf", "abs",
    "sqrt", "rsqrt", "square", "pow", "neg", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "clamp_max", "clamp_max_", "softmax", "log_softmax", "add", "add_", "sub", "sub_", "mul",
    "mul_", "div", "div_", "addcmul", "addcdiv", "contiguous", "clone", "detach"}
# Methods that only change a tensor's dtype or device (a second tensor argument, as in
# ``type_as``, gives only its dtype).
CAST_METHODS = {"float", "double", "half", "to", "type_as", "type"}
# Softmax couples the channels it normalises: fine on the logits only (checked at the end).
SOFTMAX_FUNCTIONS: set[Callable[..., Any]] = {F.softmax, F.log_softmax, torch.softmax,
                                              torch.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
SPATIAL_FUNCTIONS: set[Callable[..., Any]] = {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate}
SHAPE_FUNCTIONS: set[Callable[..., Any]] = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
    torch.movedim, torch.squeeze, torch.unsqueeze, torch.narrow, operator.getitem, torch.roll}
SHAPE_METHODS = {"view", "reshape", "permute", "transpose", "swapaxes", "movedim", "flatten",
                  "unflatten", "squeeze", "unsqueeze", "narrow", "expand", "expand_as",
                  "view_as", "reshape_as", "__getitem__", "roll"}
SPLIT_FUNCTIONS: set[Callable[..., Any]] = {torch.chunk, torch.split, torch.tensor_split,
                                             torch.unbind}
SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}
REDUCTIONS: set[Callable[..., Any]] = {torch.mean, torch.sum, torch.amax, torch.amin,
                                       torch.norm, torch.linalg.vector_norm}
REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "norm"}
# reductions whose dims come after an order argument: ``x.norm(p, dim, keepdim)``
NORM_REDUCTIONS: set[Any] = {"norm", torch.norm, torch.linalg.vector_norm}
# Functions libraries keep out of fx traces (``torch.fx.wrap``) that scale each sample as a
# whole, so every channel keeps its place: (module, name), matched without importing them.
WRAPPED_PER_SAMPLE = {("torchvision.ops.stochastic_depth", "stochastic_depth")}
# Functions kept out of fx traces that only move elements (Swin's patch merging: four
# strided slices concatenated along the channels): replayed on the channel index.
WRAPPED_SHAPE = {("torchvision.models.swin_transformer", "_patch_merging_pad")}
# Queries whose answer is shape metadata, never data: safe to ignore.
META_METHODS = {"size", "dim", "numel"}
META_ATTRS = {"shape", "ndim", "dtype", "device"}
#: the attributes by which an attention layer states its head count
HEAD_ATTRS = ("num_heads", "n_heads")
BATCH = 2  # batch size of the example input the graph is traced and shape-propagated with


class NormLeafTracer(torch.fx.Tracer):
    """fx's tracer, with every BatchNorm and GroupNorm subclass a leaf: a norm-act layer (BN
    or GroupNorm then an activation, as in timm) stays one module, so slicing can keep its
    class; and every
    attention layer (:func:`attention_leaf`) a leaf too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)) or \
            attention_leaf(m) or \
            super().is_leaf_module(m, module_qualified_name)


def attention_leaf(m: nn.Module) -> bool:
    """Whether ``m`` is an attention layer the channel graph takes as one node:
    ``nn.MultiheadAttention``, :class:`~modellego.models.attention.HeadAttention`, or the
    innermost module with an integer ``num_heads`` or ``n_heads`` (timm's, Swin's, MaxViT's
    and others' attention layers)."""
    if isinstance(m, (nn.MultiheadAttention, HeadAttention)):
        return True
    if not _heads_attr(m):
        return False
    return not any(_heads_attr(c) for c in m.modules() if c is not m)


def _heads_attr(m: nn.Module) -> bool:
    for attr in HEAD_ATTRS:
        heads = getattr(m, attr, None)
        if isinstance(heads, int) and not isinstance(heads, bool):
            return True
    return False


class ValueShapeProp(ShapeProp):
    """ShapeProp that also keeps small non-tensor results (sizes, ints) as ``meta['value']``
    so shape ops can be replayed with the very arguments the model computed."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if _plain(result):
            n.meta["value"] = result
        return result


def _plain(v: Any) -> bool:
    if isinstance(v, (int, float, bool, str, slice, torch.dtype, torch.device)) or v is None:
        return True
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return False


def trace_model(model: nn.Module) -> torch.fx.GraphModule:
    tracer = NormLeafTracer()
    graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def channelwise(module: nn.Module) -> bool:
    """Whether ``module`` maps every element alone (an activation or dropout, possibly of
    a library of its own): checked by tracing it, never assumed from its name."""
    if isinstance(module, ELEMENTWISE_MODULES):
        return True
    if any(True for _ in module.parameters(recurse=False)) or \
            any(True for _ in module.buffers(recurse=False)):
        return False
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception:  # fx raises many types for untraceable code
        return False
    subs = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module" and channelwise(subs[node.target]):
            continue
        if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
            continue
        if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
            continue
        return False
    return True



def varying_dims(ids: torch.Tensor) -> list[int]:
    """The dims (after the batch dim) along which an index tensor changes."""
    return [d for d in range(1, ids.dim())
            if ids.shape[d] > 1 and bool((ids != ids.narrow(d, 0, 1)).any())]


def flat_args(node: torch.fx.Node) -> list[Any]:
    out: list[Any] = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), out.append)
    return out


def value_of(arg: Any, where: str) -> Any:
    """A node argument with every non-tensor node replaced by the value it had."""
    if isinstance(arg, torch.fx.Node):
        if "value" not in arg.meta:
            raise UnsupportedModelError(f"{where}: an argument computed from tensor data")
        return arg.meta["value"]
    if isinstance(arg, (list, tuple)):
        return type(arg)(value_of(a, where) for a in arg)
    if isinstance(arg, slice):
        return slice(value_of(arg.start, where), value_of(arg.stop, where),
                     value_of(arg.step, where))
    if isinstance(arg, dict):
        return {k: value_of(v, where) for k, v in arg.items()}
    return arg


def call_on(node: torch.fx.Node, tensor: torch.Tensor, where: str) -> Any:
    """Node ``node``'s op on ``tensor`` in place of its first argument."""
    args = [value_of(a, where) for a in node.args[1:]]
    kwargs = value_of(dict(node.kwargs), where)
    if node.op == "call_method":
        return getattr(tensor, str(node.target))(*args, **kwargs)
    fn = node.target
    if not callable(fn):
        raise UnsupportedModelError(f"{where}: not a callable op")
    return fn(tensor, *args, **kwargs)


def tensor_bytes(meta: Any) -> int:
    """Bytes of the tensors ShapeProp recorded for one node (tuples and dicts summed)."""
    if meta is None:
        return 0
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    if isinstance(shape, torch.Size) and isinstance(dtype, torch.dtype):  # (a NamedTuple)
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if isinstance(meta, (tuple, list)):
        return sum(tensor_bytes(m) for m in meta)
    if isinstance(meta, dict):
        return sum(tensor_bytes(m) for m in meta.values())
    return 0


def shape_of(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) \
        else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def target_name(node: torch.fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)
