"""The channel graph: which tensors of a traced CNN share channels, and who reads and writes them.

A *space* is a set of channels that must be kept or removed together. A conv or linear layer
creates a space for its outputs; BN, activations and pooling pass their input space through;
a residual add (or any elementwise op of two tensors) merges the spaces of its operands; a
depthwise conv maps channel ``i`` to channel ``i`` and so also keeps its input space. The
*layout* of a tensor says which spaces its channel (or feature) axis is made of, in order:
a concatenation lists several segments, and a flatten of a ``C x H x W`` map repeats every
channel ``H * W`` times. Anything the graph builder does not understand is refused with the
name of the node, so a component is never silently wrong.
"""

from __future__ import annotations

import contextlib
import io
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import Argument
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class Segment:
    """``size`` channels of one space, each repeated ``repeat`` times in a row."""

    space: int
    size: int
    repeat: int = 1


Layout = tuple[Segment, ...]
_TRACE_LOCK = threading.Lock()

# Modules whose output has the input's channels, one to one.
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
                 nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.PReLU, nn.Identity,
                 nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool2d, nn.Softmax, nn.LogSoftmax, nn.ZeroPad2d)
_PASS_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish,
                   F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.relu, torch.sigmoid, torch.tanh,
                   F.softmax, F.log_softmax, torch.softmax, F.sigmoid, F.tanh,
                   operator.neg, torch.neg}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach",
                 "softmax", "log_softmax", "float", "clamp", "clamp_min"}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                operator.imul, operator.truediv, torch.add, torch.sub, torch.mul}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}


@dataclass
class Layer:
    """A conv or linear layer as the graph sees it."""

    name: str
    module: nn.Conv2d | nn.Linear  # the builder records only these two
    kind: str                      # "conv" | "linear"
    in_layout: Layout
    out_space: int
    depthwise: bool = False
    frozen: bool = False           # grouped conv: its channels are never pruned
    bn_after: str | None = None    # the BatchNorm that alone reads this conv's output


@dataclass
class ChannelGraph:
    """The traced model, its layers in topological order and the channel spaces."""

    model: nn.Module
    graph_module: torch.fx.GraphModule
    layers: list[Layer]
    norms: dict[str, int]                     # BatchNorm name -> space
    space_size: dict[int, int]
    frozen_spaces: set[int]
    input_spaces: set[int]
    output_space: int
    _parent: dict[int, int] = field(repr=False, default_factory=dict)

    def find(self, space: int) -> int:
        """The root of a space (after merges)."""
        while self._parent.get(space, space) != space:
            space = self._parent[space]
        return space

    def spaces(self) -> list[int]:
        """All root spaces, in creation order."""
        return sorted({self.find(s) for s in self.space_size})

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def output_layer(self) -> Layer:
        """The layer that writes the logits."""
        writers = [lay for lay in self.layers if lay.out_space == self.output_space]
        return writers[-1]


class _Builder:
    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.input_shape = tuple(input_shape)
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.frozen: set[int] = set()
        self.layers: list[Layer] = []
        self.norms: dict[str, list[int]] = {}
        self.seen_modules: dict[str, Layer] = {}

    # -- spaces ------------------------------------------------------------------------
    def new_space(self, size: int) -> int:
        sid = len(self.size)
        self.size[sid] = size
        self.parent[sid] = sid
        return sid

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise UnsupportedModelError(
                f"{where}: couples channel groups of different sizes "
                f"({self.size[ra]} and {self.size[rb]})")
        self.parent[max(ra, rb)] = min(ra, rb)
        if ra in self.frozen or rb in self.frozen:
            self.frozen.add(min(ra, rb))

    def merge_layouts(self, a: Layout, b: Layout, where: str) -> Layout:
        if len(a) != len(b) or any(x.size != y.size or x.repeat != y.repeat
                                   for x, y in zip(a, b)):
            raise UnsupportedModelError(
                f"{where}: combines two tensors whose channels are laid out differently; "
                "modellego cannot keep their channels consistent")
        for x, y in zip(a, b):
            self.union(x.space, y.space, where)
        return a

    # -- graph walk --------------------------------------------------------------------
    def build(self) -> ChannelGraph:
        try:
            with _TRACE_LOCK:  # fx patches torch functions while tracing: one at a time
                gm = torch.fx.symbolic_trace(self.model)
        except Exception as exc:  # fx raises many types for untraceable code
            raise UnsupportedModelError(
                f"{type(self.model).__name__} cannot be traced with torch.fx "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "modellego needs a static graph: move data-dependent control flow out of "
                "forward() or wrap it in a leaf module") from None
        example = torch.zeros(2, *self.input_shape)
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            gm.eval()
            # ShapeProp prints a traceback and wraps the model's own error: keep quiet and
            # report the original error in one line
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(gm).propagate(example)
        except Exception as exc:
            cause = exc.__cause__ or exc
            text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise UnsupportedModelError(
                f"running the traced model on an input of shape {list(self.input_shape)} "
                f"failed ({type(cause).__name__}: {text}); check the input shape the model "
                "expects") from None
        finally:  # restore each submodule's own flag (a model may mix train and eval)
            for m, mode in modes:
                m.training = mode
        layouts: dict[torch.fx.Node, Any] = {}
        inputs: set[int] = set()
        output_layout = None
        for node in gm.graph.nodes:
            where = f"node {node.name!r} ({node.op} {_target_name(node)})"
            if node.op == "placeholder":
                shape = _shape(node)
                if shape is None or len(shape) < 2:
                    raise UnsupportedModelError(f"{where}: expected an image batch input")
                sid = self.new_space(shape[1])
                self.frozen.add(sid)
                inputs.add(sid)
                layouts[node] = (Segment(sid, shape[1]),)
            elif node.op == "get_attr":
                layouts[node] = None
            elif node.op == "call_module":
                layouts[node] = self.call_module(node, layouts, where)
            elif node.op in ("call_function", "call_method"):
                layouts[node] = self.call_function(node, layouts, where)
            elif node.op == "output":
                output_layout = layouts.get(node.args[0])
        if not output_layout or len(output_layout) != 1 or output_layout[0].repeat != 1:
            raise UnsupportedModelError(
                "the model output must be a single logits tensor written by one conv or "
                "linear layer")
        by_name = {lay.name: lay for lay in self.layers}
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target],
                                                        nn.BatchNorm2d):
                src = node.args[0]
                if isinstance(src, torch.fx.Node) and src.op == "call_module" and \
                        src.target in by_name and len(src.users) == 1:
                    by_name[src.target].bn_after = str(node.target)
        out_space = self.find(output_layout[0].space)
        for lay in self.layers:
            lay.out_space = self.find(lay.out_space)
            lay.in_layout = tuple(Segment(self.find(s.space), s.size, s.repeat)
                                  for s in lay.in_layout)
        if out_space not in {lay.out_space for lay in self.layers}:
            raise UnsupportedModelError("the logits are not written by a conv or linear layer")
        norms = {}
        for name, spaces in self.norms.items():
            roots = {self.find(s) for s in spaces}
            if len(roots) != 1:
                raise UnsupportedModelError(f"{name}: one BatchNorm applied to different "
                                            "channel groups")
            norms[name] = roots.pop()
        frozen = {self.find(s) for s in self.frozen}
        return ChannelGraph(self.model, gm, self.layers, norms, dict(self.size), frozen,
                            {self.find(s) for s in inputs}, out_space, dict(self.parent))

    def arg_layout(self, arg: Any, layouts: dict, where: str) -> Layout:
        if not isinstance(arg, torch.fx.Node) or layouts.get(arg) is None:
            raise UnsupportedModelError(f"{where}: expected a tensor argument")
        return layouts[arg]

    def call_module(self, node: torch.fx.Node, layouts: dict, where: str) -> Layout | None:
        mod = self.modules[node.target]
        name = str(node.target)
        src = self.arg_layout(node.args[0], layouts, where)
        if isinstance(mod, nn.Conv2d):
            return self.conv(name, mod, src, where)
        if isinstance(mod, nn.Linear):
            return self.linear(name, mod, src, node, where)
        if isinstance(mod, nn.BatchNorm2d):
            if len(src) != 1:
                # BN over a concatenation: record each part (all parts must map to one BN
                # slice each); simplest correct handling is to freeze the concatenated parts
                raise UnsupportedModelError(f"{where}: BatchNorm over a concatenation is not "
                                            "supported")
            self.norms.setdefault(name, []).append(src[0].space)
            return src
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, src, mod.start_dim, where)
        if isinstance(mod, _PASS_MODULES):
            return src
        raise UnsupportedModelError(
            f"{where}: layer type {type(mod).__name__} is not supported; supported are "
            "Conv2d, Linear, BatchNorm2d, Flatten, pooling, dropout and activations")

    def conv(self, name: str, mod: nn.Conv2d, src: Layout, where: str) -> Layout:
        if mod.padding_mode != "zeros":
            raise UnsupportedModelError(f"{where}: padding_mode {mod.padding_mode!r} is not "
                                        "supported (only 'zeros')")
        if any(s.repeat != 1 for s in src):
            raise UnsupportedModelError(f"{where}: conv input has flattened channels")
        if name in self.seen_modules:
            raise UnsupportedModelError(f"{where}: conv {name} is called more than once "
                                        "(shared weights are not supported)")
        groups = mod.groups
        depthwise = groups > 1 and groups == mod.in_channels == mod.out_channels
        if depthwise:
            out_layout = src
            out_space = src[0].space if len(src) == 1 else None
            if out_space is None:
                raise UnsupportedModelError(f"{where}: depthwise conv over a concatenation")
            layer = Layer(name, mod, "conv", src, out_space, depthwise=True)
        else:
            out_space = self.new_space(mod.out_channels)
            out_layout = (Segment(out_space, mod.out_channels),)
            layer = Layer(name, mod, "conv", src, out_space)
            if groups > 1:  # grouped but not depthwise: keep every channel it touches
                layer.frozen = True
                self.frozen.add(out_space)
                for s in src:
                    self.frozen.add(s.space)
        self.layers.append(layer)
        self.seen_modules[name] = layer
        return out_layout

    def linear(self, name: str, mod: nn.Linear, src: Layout, node: torch.fx.Node,
               where: str) -> Layout:
        shape = _shape(node.args[0])
        if shape is None or len(shape) != 2:
            raise UnsupportedModelError(f"{where}: linear layers must read a (batch, features) "
                                        f"tensor, got shape {shape}")
        if name in self.seen_modules:
            raise UnsupportedModelError(f"{where}: linear {name} is called more than once "
                                        "(shared weights are not supported)")
        out_space = self.new_space(mod.out_features)
        layer = Layer(name, mod, "linear", src, out_space)
        self.layers.append(layer)
        self.seen_modules[name] = layer
        return (Segment(out_space, mod.out_features),)

    def flatten(self, node: torch.fx.Node, src: Layout, start_dim: Argument,
                where: str) -> Layout:
        in_shape = _shape(node.args[0])
        out_shape = _shape(node)
        if in_shape is None or out_shape is None or start_dim != 1 or len(out_shape) != 2:
            raise UnsupportedModelError(f"{where}: only flatten from dim 1 to (batch, "
                                        "features) is supported")
        spatial = 1
        for d in in_shape[2:]:
            spatial *= d
        return tuple(Segment(s.space, s.size, s.repeat * spatial) for s in src)

    def call_function(self, node: torch.fx.Node, layouts: dict, where: str) -> Layout | None:
        target = node.target
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node)
                       and layouts.get(a) is not None]
        if node.op == "call_method" and target in ("size", "dim"):
            return None
        if target is getattr or target is operator.getitem and not tensor_args:
            return None
        if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            src = self.arg_layout(node.args[0], layouts, where)
            return self.flatten(node, src, start, where)
        if node.op == "call_method" and target in ("view", "reshape") or target is torch.reshape:
            src = self.arg_layout(node.args[0], layouts, where)
            in_shape, out_shape = _shape(node.args[0]), _shape(node)
            if in_shape is not None and out_shape is not None and len(out_shape) == 2 \
                    and in_shape[0] == out_shape[0] and len(in_shape) >= 2:
                return self.flatten(node, src, 1, where)
            if in_shape == out_shape:
                return src
            raise UnsupportedModelError(f"{where}: reshape from {in_shape} to {out_shape} "
                                        "is not supported (only flattening to (batch, -1))")
        if target is torch.cat or (node.op == "call_method" and target == "cat"):
            parts = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            out_shape = _shape(node)
            if isinstance(dim, int) and dim < 0 and out_shape is not None:
                dim += len(out_shape)
            if dim != 1:
                raise UnsupportedModelError(f"{where}: concatenation along dim {dim} is not "
                                            "supported (only the channel dim 1)")
            if not isinstance(parts, (list, tuple)):
                raise UnsupportedModelError(f"{where}: expected a list of tensors to concatenate")
            out: list[Segment] = []
            for p in parts:
                out.extend(self.arg_layout(p, layouts, where))
            return tuple(out)
        if target in (torch.mean, torch.amax, torch.sum) or (
                node.op == "call_method" and target in ("mean", "amax", "sum")):
            src = self.arg_layout(node.args[0], layouts, where)
            in_shape, out_shape = _shape(node.args[0]), _shape(node)
            if in_shape and out_shape and len(in_shape) == 4 and out_shape[:2] == in_shape[:2]:
                return src  # pooling over the spatial dims
            raise UnsupportedModelError(f"{where}: reduction over the channel dimension")
        if target in _PASS_FUNCTIONS or (node.op == "call_method" and target in _PASS_METHODS):
            return self.arg_layout(node.args[0], layouts, where)
        if target in _ELEMENTWISE or (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            return self.elementwise(node, tensor_args, layouts, where)
        raise UnsupportedModelError(
            f"{where}: operation {_target_name(node)} is not supported by the channel graph; "
            "supported are conv/linear/BN modules, activations, pooling, flatten, "
            "elementwise add/mul, and torch.cat along channels")

    def elementwise(self, node: torch.fx.Node, tensor_args: list, layouts: dict,
                    where: str) -> Layout:
        out_shape = _shape(node)
        full = [a for a in tensor_args if _shape(a) == out_shape]
        if not full:
            raise UnsupportedModelError(f"{where}: cannot relate the output channels to the "
                                        "inputs")
        result = layouts[full[0]]
        for other in tensor_args:
            shape = _shape(other)
            if shape is not None and len(shape) >= 2 and shape[1] == 1:
                continue  # broadcast over channels: no coupling
            result = self.merge_layouts(result, layouts[other], where)
        return result


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) \
        else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def build_channel_graph(model: nn.Module, input_shape: Sequence[int]) -> ChannelGraph:
    """Trace ``model`` and work out which channels are coupled.

    ``input_shape`` is ``(C, H, W)`` of one image. Raises :class:`UnsupportedModelError`
    naming the node for any pattern it cannot handle.
    """
    return _Builder(model, input_shape).build()
