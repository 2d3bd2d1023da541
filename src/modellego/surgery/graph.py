"""The channel graph: which tensors of a traced CNN share channels, and who reads and writes them.

A *space* is a set of channels that must be kept or removed together. A conv or linear layer
creates a space for its outputs; BN, activations and pooling pass their input space through;
a residual add (or any elementwise op of two tensors) merges the spaces of its operands; a
depthwise conv maps channel ``i`` to channel ``i`` and so also keeps its input space.

The *layout* of a tensor axis says which channels it holds, in order, as runs: a
:class:`Segment` is ``size`` consecutive channels of one space starting at ``start``, each
repeated ``repeat`` times in a row. A concatenation lists several runs, a flatten of a
``C x H x W`` map repeats every channel ``H * W`` times, a slice ``x[:, a:b]`` or a ``chunk``
keeps part of a run and a channel shuffle interleaves runs of one channel each.

How shape ops are followed: while building, every tensor carries its *base* (the channels it
holds, as runs) and, when its channels are not simply laid along one axis, an index tensor
of its shape (batch 1) holding, for each element, the position of its channel in the base.
A view, reshape, permute, transpose, flatten, slice, chunk, split or concat is replayed on
that index tensor (with the batch index folded in, so an op that mixes samples is caught),
and the layout an axis holds is read off the result. So a channel shuffle is a permutation
read from ``view -> transpose -> view``, and a channel-last ``permute -> Linear`` reads the
channels on the last axis, without rules per pattern.

Couplings are exact or refused. Two whole spaces of an elementwise op are merged
(union-find); two runs that are parts of spaces are *tied* (a plan keeps a channel of one
run exactly when it keeps the matching channel of the other, see :mod:`.plan`). A component
runs the source's forward code on fewer channels, so ops that depend on the channel count
are constrained too: the parts of a ``chunk`` and the groups of a
``view(b, g, c // g, h, w)`` (a channel shuffle) are tied one to one, so they shrink alike.
Ops that would cut or size the channels at the source's fixed numbers (``x[:, :n]``,
``split`` with sizes, ``view(b, 512, -1)``), and ops that mix the channels they see so that
none can be removed without changing the others (LayerNorm over channels, GroupNorm, grouped
convolutions) *freeze* the spaces involved: they are always kept whole, and
:attr:`ChannelGraph.frozen_reasons` says why. A reduction or a softmax over channels (other
than the logits) is refused.

Per-channel tensors that are not conv/linear/BN modules (a layer-scale parameter read
through ``get_attr``, a PReLU weight, a BN over a concatenation) are recorded in
:attr:`ChannelGraph.channel_params` with the layout they follow, so a plan slices them too.
Anything the builder does not understand is refused with the name of the node, so a
component is never silently wrong.
"""

from __future__ import annotations

import contextlib
import io
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from ..models.attention import heads_of, takes_rope
from .trace import (
    BATCH,
    CAST_METHODS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    META_ATTRS,
    META_METHODS,
    NORM_REDUCTIONS,
    REDUCTION_METHODS,
    REDUCTIONS,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
    SHAPE_MODULES,
    SOFTMAX_FUNCTIONS,
    SOFTMAX_METHODS,
    SPATIAL_FUNCTIONS,
    SPATIAL_MODULES,
    SPLIT_FUNCTIONS,
    SPLIT_METHODS,
    TRACE_LOCK,
    WRAPPED_PER_SAMPLE,
    WRAPPED_SHAPE,
    ValueShapeProp,
    attention_leaf,
    call_on,
    channelwise,
    flat_args,
    shape_of,
    target_name,
    tensor_bytes,
    trace_model,
    value_of,
    varying_dims,
)


@dataclass(frozen=True)
class Segment:
    """``size`` channels of one space from channel ``start`` on, each repeated ``repeat``
    times in a row."""

    space: int
    size: int
    repeat: int = 1
    start: int = 0

    @property
    def width(self) -> int:
        """How many features of the axis this run covers (``size * repeat``)."""
        return self.size * self.repeat


Layout = tuple[Segment, ...]


@dataclass
class Layer:
    """A conv or linear layer as the graph sees it."""

    name: str
    module: nn.Conv2d | nn.Linear  # the builder records only these two
    kind: str                      # "conv" | "linear"
    in_layout: Layout
    out_space: int                 # depthwise: the space of its (first) input run
    depthwise: bool = False
    frozen: bool = False           # grouped conv: its channels are never pruned
    bn_after: str | None = None    # the BatchNorm that alone reads this conv's output
    #: the runs its outputs are: one whole new space, or (depthwise) its input layout
    out_layout: Layout = ()


@dataclass
class ChannelGraph:
    """The traced model, its layers in topological order and the channel spaces."""

    model: nn.Module
    graph_module: torch.fx.GraphModule
    layers: list[Layer]
    norms: dict[str, int]                     # BatchNorm over exactly one space -> space
    space_size: dict[int, int]
    frozen_spaces: set[int]
    input_spaces: set[int]
    output_space: int
    _parent: dict[int, int] = field(repr=False, default_factory=dict)
    #: why each frozen space (by root) is kept whole, for reports
    frozen_reasons: dict[int, str] = field(default_factory=dict)
    #: other per-channel modules (a BN over several runs) and parameters or buffers (by
    #: qualified name) -> the layout their one non-singleton axis follows
    channel_params: dict[str, Layout] = field(default_factory=dict)
    #: pairs of runs of the same length whose channels are kept alike, one to one
    ties: list[tuple[Segment, Segment]] = field(default_factory=list)
    #: attention layers whose heads can be removed (module name -> the space of its heads;
    #: its output projection is the layer ``name + ".proj"``, reading each head's
    #: ``head_dim`` features as one channel repeated)
    attention: dict[str, int] = field(default_factory=dict)
    #: GroupNorm modules whose groups can be removed whole (module name -> the layout of
    #: its channels; the channels of one group are tied together in ``ties``)
    group_norms: dict[str, Layout] = field(default_factory=dict)

    def find(self, space: int) -> int:
        """The root of a space (after merges)."""
        while self._parent.get(space, space) != space:
            space = self._parent[space]
        return space

    def sample_bytes(self) -> int:
        """The bytes of the largest value the traced network computes for one input (from
        the shapes the graph was built with; at the source's widths, so an upper bound for
        a component)."""
        return max((tensor_bytes(node.meta.get("tensor_meta")) // BATCH
                    for node in self.graph_module.graph.nodes), default=0)

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
        writers = [lay for lay in self.layers if lay.out_space == self.output_space
                   and not lay.depthwise]
        return writers[-1]

    @property
    def plain(self) -> bool:
        """Every layout is made of whole spaces, with no ties and no extra per-channel
        tensors (what block-diagonal assembly needs)."""
        whole = all(s.start == 0 and s.size == self.space_size[s.space]
                    for lay in self.layers for s in lay.in_layout)
        return whole and not self.ties and not self.channel_params and not self.group_norms


# --------------------------------------------------------------------------- tensor facts


@dataclass
class _Chan:
    """What the builder knows of a tensor: its channels ``base`` (runs, repeat 1) and where
    they are. ``axis`` set: the base lies along that axis, in order, and nothing else varies.
    Otherwise ``ids`` (shape of the tensor, batch 1) holds each element's base position."""

    base: Layout
    shape: tuple[int, ...]
    axis: int | None = None
    ids: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return sum(s.size for s in self.base)

    def full_ids(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The index tensor, broadcast to ``shape`` (batch 1) when given."""
        if self.ids is not None:
            ids = self.ids
        else:
            view = [1] * len(self.shape)
            view[self.axis if self.axis is not None else 1] = -1
            ids = torch.arange(self.count).view(view).expand(1, *self.shape[1:])
        if shape is not None:
            ids = ids.expand(1, *shape[1:])
        return ids

    def along(self, axis: int) -> Layout | None:
        """The layout ``axis`` holds, or ``None`` when the channels also vary along
        another axis (then no single axis holds them)."""
        axis = axis % len(self.shape)
        if self.ids is None:
            return self.base if axis == self.axis else None
        t = self.ids.movedim(axis, -1).reshape(-1, self.ids.shape[axis])
        if not bool((t == t[:1]).all()):
            return None
        return _compose(self.base, t[0].tolist())


@dataclass
class _Const:
    """A tensor read from the model (``get_attr``) and transformed elementwise or by
    reshapes: ``name`` (``None`` for a constant the model does not own as a parameter or
    buffer), its size, and, when its values run along one axis of its current ``ndim``
    dims, that axis. ``numel == -1``: transformed in a way the builder does not follow
    (refused if it ever meets channels)."""

    name: str | None
    numel: int
    axis: int | None
    ndim: int = 0
    #: its shape (before broadcasting; empty when not followed)
    shape: tuple[int, ...] = ()


def _positions(base: Layout) -> list[tuple[int, int]]:
    return [(s.space, s.start + i) for s in base for i in range(s.size)]


def _compose(base: Layout, seq: Sequence[int]) -> Layout:
    """The layout of a sequence of base positions: runs of consecutive channels of one
    space, each position repeated the same number of times."""
    pos = _positions(base)
    reps: list[list[int]] = []  # [position, repeat]
    for p in seq:
        if reps and reps[-1][0] == p:
            reps[-1][1] += 1
        else:
            reps.append([p, 1])
    out: list[Segment] = []
    for p, r in reps:
        space, ch = pos[p]
        last = out[-1] if out else None
        if last is not None and last.space == space and last.repeat == r and \
                last.start + last.size == ch:
            out[-1] = Segment(space, last.size + 1, r, last.start)
        else:
            out.append(Segment(space, 1, r, ch))
    return tuple(out)


def _cut(layout: Layout, start: int, stop: int) -> Layout:
    """Base positions ``start..stop`` of a repeat-1 layout."""
    out, offset = [], 0
    for s in layout:
        a, b = max(start, offset), min(stop, offset + s.size)
        if a < b:
            out.append(Segment(s.space, b - a, 1, s.start + a - offset))
        offset += s.size
    return tuple(out)


# --------------------------------------------------------------------------- the builder


class _Builder:
    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.tensors = {n for n, _ in model.named_parameters()} | \
            {n for n, _ in model.named_buffers()}
        self.input_shape = tuple(input_shape)
        self.parent: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.frozen: dict[int, str] = {}
        self.layers: list[Layer] = []
        self.norms: dict[str, Layout] = {}
        self.group_norms: dict[str, Layout] = {}
        self.params: dict[str, Layout] = {}
        self.ties: list[tuple[Segment, Segment]] = []
        self.seen_modules: dict[str, Layer] = {}
        self.softmaxes: list[tuple[str, Layout]] = []  # (where, the channels it normalises)
        self.attention: dict[str, int] = {}
        self.where = ""

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

    def freeze(self, spaces: Any, reason: str) -> None:
        for s in spaces:
            self.frozen.setdefault(self.find(s), reason)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise UnsupportedModelError(
                f"{self.where}: couples channel groups of different sizes "
                f"({self.size[ra]} and {self.size[rb]})")
        keep, gone = min(ra, rb), max(ra, rb)
        self.parent[gone] = keep
        if gone in self.frozen:
            self.frozen.setdefault(keep, self.frozen.pop(gone))

    def resolved(self, layout: Layout) -> Layout:
        """``layout`` in root spaces (as it reads after the merges made so far)."""
        return tuple(Segment(self.find(s.space), s.size, s.repeat, s.start) for s in layout)

    def couple_runs(self, a: Segment, b: Segment) -> None:
        """Channel ``a.start + i`` is channel ``b.start + i`` (same length runs)."""
        if a.start == 0 and a.size == self.size[a.space] and \
                b.start == 0 and b.size == self.size[b.space]:
            self.union(a.space, b.space)
        elif not (self.find(a.space) == self.find(b.space) and a.start == b.start):
            self.ties.append((a, b))

    def couple_layouts(self, a: Layout, b: Layout) -> None:
        """Position ``i`` of ``a`` is position ``i`` of ``b`` (repeat-1 layouts)."""
        i = j = 0
        ua = va = 0  # used part of the current run of a / of b
        while i < len(a) and j < len(b):
            n = min(a[i].size - ua, b[j].size - va)
            self.couple_runs(Segment(a[i].space, n, 1, a[i].start + ua),
                             Segment(b[j].space, n, 1, b[j].start + va))
            ua, va = ua + n, va + n
            if ua == a[i].size:
                i, ua = i + 1, 0
            if va == b[j].size:
                j, va = j + 1, 0

    # -- graph walk --------------------------------------------------------------------
    def build(self) -> ChannelGraph:
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            # the graph of the inference network: traced in eval mode, so training-only
            # branches (auxiliary heads, stochastic depth) are not in it
            self.model.eval()
            with TRACE_LOCK:  # fx patches torch functions while tracing: one at a time
                gm = trace_model(self.model)
        except Exception as exc:  # fx raises many types for untraceable code
            raise UnsupportedModelError(
                f"{type(self.model).__name__} cannot be traced with torch.fx "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "modellego needs a static graph: move data-dependent control flow out of "
                "forward() or wrap it in a leaf module") from None
        finally:  # restore each submodule's own flag (a model may mix train and eval)
            for m, mode in modes:
                m.training = mode
        # (a placeholder with a default value, ``forward(x, flag=False)``, needs no input)
        required = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
        if len(required) != 1:
            names = ", ".join(str(n.target) for n in required)
            where = f"node {str(required[1].target)!r} (placeholder)" if len(required) > 1 \
                else "the traced graph"
            raise UnsupportedModelError(
                f"{where}: {type(self.model).__name__}.forward takes {len(required)} inputs "
                f"({names}); modellego takes apart classifiers of one image input: wrap the "
                "model so that forward(x) takes the image alone")
        example = torch.zeros(BATCH, *self.input_shape)
        try:
            gm.eval()
            # ShapeProp prints a traceback and wraps the model's own error: keep quiet and
            # report the original error in one line
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ValueShapeProp(gm).propagate(example)
        except Exception as exc:
            cause = exc.__cause__ or exc
            text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise UnsupportedModelError(
                f"running the traced model on an input of shape {list(self.input_shape)} "
                f"failed ({type(cause).__name__}: {text}); check the input shape the model "
                "expects") from None
        finally:
            for m, mode in modes:
                m.training = mode
        facts: dict[torch.fx.Node, Any] = {}
        inputs: set[int] = set()
        output_layout: Layout | None = None
        # the index tensors are bookkeeping on the CPU, also when the caller builds the
        # model under torch.device("meta"); channelwise traces small modules
        with TRACE_LOCK, torch.device("cpu"):
            for node in gm.graph.nodes:
                self.where = f"node {node.name!r} ({node.op} {target_name(node)})"
                if node.op == "placeholder" and node.args:  # an argument left at its default
                    facts[node] = None
                elif node.op == "placeholder":
                    shape = shape_of(node)
                    if shape is None or len(shape) < 2:
                        raise UnsupportedModelError(f"{self.where}: expected an image batch "
                                                    "input")
                    sid = self.new_space(shape[1])
                    self.freeze([sid], "the input image")
                    inputs.add(sid)
                    facts[node] = _Chan((Segment(sid, shape[1]),), shape, axis=1)
                elif node.op == "get_attr":
                    facts[node] = self.get_attr(node)
                elif node.op == "call_module":
                    facts[node] = self.call_module(node, facts)
                elif node.op in ("call_function", "call_method"):
                    facts[node] = self.call_function(node, facts)
                elif node.op == "output":
                    out = facts.get(node.args[0]) if isinstance(node.args[0], torch.fx.Node) \
                        else None
                    if isinstance(out, _Chan) and len(out.shape) == 2:
                        output_layout = out.along(1)
        return self.finish(gm, output_layout, inputs)

    def finish(self, gm: torch.fx.GraphModule, output_layout: Layout | None,
               inputs: set[int]) -> ChannelGraph:
        if not output_layout or len(output_layout) != 1 or output_layout[0].repeat != 1 \
                or output_layout[0].start != 0 \
                or output_layout[0].size != self.size[output_layout[0].space]:
            raise UnsupportedModelError(
                "the model output must be a single (batch, logits) tensor written by one conv "
                "or linear layer")
        by_name = {lay.name: lay for lay in self.layers}
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target],
                                                        nn.BatchNorm2d):
                src = node.args[0]
                if isinstance(src, torch.fx.Node) and src.op == "call_module" and \
                        src.target in by_name and len(src.users) == 1 and \
                        str(node.target) in self.norms:
                    by_name[src.target].bn_after = str(node.target)

        def res(layout: Layout) -> Layout:
            return tuple(Segment(self.find(s.space), s.size, s.repeat, s.start)
                         for s in layout)

        out_space = self.find(output_layout[0].space)
        for lay in self.layers:
            lay.out_space = self.find(lay.out_space)
            lay.in_layout = res(lay.in_layout)
            lay.out_layout = res(lay.out_layout)
        if out_space not in {lay.out_space for lay in self.layers if not lay.depthwise}:
            raise UnsupportedModelError("the logits are not written by a conv or linear layer")
        norms: dict[str, int] = {}
        params = {name: res(layout) for name, layout in self.params.items()}
        for name, layout in self.norms.items():
            layout = res(layout)
            if len(layout) == 1 and layout[0].start == 0 and \
                    layout[0].size == self.size[layout[0].space]:
                norms[name] = layout[0].space
            else:
                params[name] = layout
        for where, layout in self.softmaxes:
            spaces = {self.find(seg.space) for seg in layout}
            if out_space in spaces and spaces != {out_space}:
                raise UnsupportedModelError(f"{where}: softmax over the logits and other "
                                            "channels together")
            if spaces != {out_space}:  # it couples all the channels it normalises
                self.freeze(spaces, f"softmax at {node_name(where)[6:-1]} normalises over "
                                    "these channels")
        frozen: dict[int, str] = {}
        for s, reason in self.frozen.items():
            frozen.setdefault(self.find(s), reason)
        if out_space in frozen:
            raise UnsupportedModelError(f"the logits cannot be cut to a task: {frozen[out_space]}")
        ties = []
        for a, b in self.ties:
            a, b = res((a,))[0], res((b,))[0]
            if (a.space, a.start) == (b.space, b.start):
                continue
            if out_space in (a.space, b.space):
                raise UnsupportedModelError("the logits are coupled with part of another "
                                            "channel group; they cannot be cut to a task")
            ties.append((a, b))
        return ChannelGraph(self.model, gm, self.layers, norms, dict(self.size),
                            set(frozen), {self.find(s) for s in inputs}, out_space,
                            dict(self.parent), frozen, params, ties,
                            {name: self.find(s) for name, s in self.attention.items()},
                            {name: res(layout) for name, layout in self.group_norms.items()})

    # -- helpers -----------------------------------------------------------------------
    def chan(self, arg: Any, facts: dict) -> _Chan:
        fact = facts.get(arg) if isinstance(arg, torch.fx.Node) else None
        if isinstance(fact, _Const):
            raise UnsupportedModelError(f"{self.where}: reads a tensor of the model itself "
                                        "(a parameter or constant), not a feature map")
        if not isinstance(fact, _Chan):
            raise UnsupportedModelError(f"{self.where}: expected a tensor argument")
        return fact

    def layout_on(self, chan: _Chan, axis: int, what: str, *, repeats: bool = False
                  ) -> Layout:
        layout = chan.along(axis)
        if layout is None or (not repeats and any(s.repeat != 1 for s in layout)):
            raise UnsupportedModelError(
                f"{self.where}: {what} reads a tensor whose channels are not laid along "
                f"dim {axis % len(chan.shape)} (after a reshape or permute that mixes them "
                "with other dims)")
        return layout

    def spatial(self, node: torch.fx.Node, chan: _Chan, what: str) -> _Chan:
        if len(chan.shape) != 4:
            raise UnsupportedModelError(f"{self.where}: {what} expects an (N, C, H, W) map")
        shape = shape_of(node)
        if shape is None or shape[:2] != chan.shape[:2]:
            raise UnsupportedModelError(f"{self.where}: {what} changes the channel count")
        return _Chan(self.layout_on(chan, 1, what), shape, axis=1)

    def normalised(self, base: Layout, ids: torch.Tensor, shape: tuple[int, ...]) -> _Chan:
        """A tensor fact from an index tensor: lazy when one axis holds distinct channels."""
        varying = varying_dims(ids)
        if len(varying) == 1:
            d = varying[0]
            seq = ids.movedim(d, -1).reshape(-1, ids.shape[d])[0]
            if len(set(seq.tolist())) == len(seq):
                return _Chan(_compose(base, seq.tolist()), shape, axis=d)
        return _Chan(base, shape, ids=ids.contiguous())

    # -- get_attr ----------------------------------------------------------------------
    def get_attr(self, node: torch.fx.Node) -> _Const | None:
        shape = shape_of(node)
        if shape is None:
            return None
        name = str(node.target) if str(node.target) in self.tensors else None
        return _const(name, shape)

    # -- modules -----------------------------------------------------------------------
    def call_module(self, node: torch.fx.Node, facts: dict) -> Any:
        mod = self.modules[node.target]
        name = str(node.target)
        if attention_leaf(mod):
            return self.attention_layer(name, mod, node, facts)
        src = self.chan(node.args[0], facts)
        if isinstance(mod, nn.Conv2d):
            return self.conv(name, mod, src, node)
        if isinstance(mod, nn.Linear):
            return self.linear(name, mod, src, node)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.batchnorm(name, mod, src, node)
        if isinstance(mod, nn.LayerNorm):
            return self.layer_norm(src, tuple(mod.normalized_shape), f"LayerNorm {name}")
        if isinstance(mod, nn.GroupNorm):
            return self.group_norm_module(name, mod, src)
        if isinstance(mod, SHAPE_MODULES):
            return self.replay(node, [src], lambda v: mod(v[0]))
        if isinstance(mod, SPATIAL_MODULES):
            return self.spatial(node, src, type(mod).__name__)
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                self.record_param(f"{name}.weight", self.layout_on(src, 1, "PReLU"))
            return src
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(src, mod.dim)
        if isinstance(mod, ELEMENTWISE_MODULES):
            return src
        raise UnsupportedModelError(
            f"{self.where}: layer type {type(mod).__name__} is not supported; supported are "
            "Conv2d, Linear, BatchNorm1d, BatchNorm2d (and subclasses), LayerNorm, GroupNorm, "
            "Flatten, "
            "pooling, dropout and activations")

    def attention_layer(self, name: str, mod: nn.Module, node: torch.fx.Node,
                        facts: dict) -> Any:
        """An attention layer, kept as one node by the tracer. Standard multi-head
        self-attention (:func:`~modellego.models.attention.as_head_attention`) gets a space
        of heads, read by its output projection as a linear layer reads a flattened map
        (each head one channel of ``head_dim`` features): removing a head removes its q, k
        and v rows and its projection columns. Any other attention layer is kept whole.
        Either way its input (what q, k and v are computed from) is kept whole."""
        args = [a for a in flat_args(node) if isinstance(facts.get(a), _Chan)]
        if not args or args[0] is not node.args[0]:
            raise UnsupportedModelError(f"{self.where}: attention layer without a token input")
        src = facts[args[0]]
        if len(src.shape) < 3 or src.along(-1) is None:
            raise UnsupportedModelError(f"{self.where}: attention over a tensor whose channels "
                                        "are not on its last dim")
        self.freeze([s.space for a in args for s in facts[a].base],
                    f"the input of attention {name} (its q, k and v projections) is kept whole")
        # anything else it is called with is the same tokens (nn.MultiheadAttention's
        # query, key, value), absent, None or False; or a rotary embedding made without the
        # image (EVA's rope: the same rotation for every head and every image)
        rope = node.kwargs.get("rope") if takes_rope(mod) else None
        extra = [a for a in list(node.args[1:]) + list(node.kwargs.values())
                 if a is not node.args[0] and
                 not (a is rope and isinstance(a, torch.fx.Node) and _input_free(a)) and
                 (a.meta.get("value", a) if isinstance(a, torch.fx.Node) else a)
                 not in (None, False)]
        # heads are units of attention over one image's tokens (not over windows folded
        # into the batch: their contributions could not be told apart per image)
        layout = heads_of(mod) if not extra and src.shape[0] == BATCH else None
        out = self.attention_out(node)
        if layout is not None and out == src.shape[:-1] + (layout.proj.out_features,):
            heads = self.new_space(layout.count)
            self.attention[name] = heads
            proj = next(n for n, m in mod.named_modules() if m is layout.proj)
            fact = self.linear(f"{name}.{proj}", layout.proj,
                               _Chan((Segment(heads, layout.count, layout.dim),),
                                     src.shape[:-1] + (layout.count * layout.dim,),
                                     axis=len(out) - 1), node, out)
            return self.attention_result(node, _Chan(fact.base, out, axis=len(out) - 1))
        if len(out) < 3:
            raise UnsupportedModelError(f"{self.where}: attention layer {type(mod).__name__} "
                                        "whose output is not a (batch, ..., channels) tensor")
        space = self.new_space(out[-1])
        why = "it is not standard multi-head self-attention over its one input" \
            if src.shape[0] == BATCH else "it attends within windows folded into the batch"
        self.freeze([space], f"attention {name} ({type(mod).__name__}) is kept whole: {why}")
        return self.attention_result(node, _Chan((Segment(space, out[-1]),), out,
                                                 axis=len(out) - 1))

    @staticmethod
    def attention_out(node: torch.fx.Node) -> tuple[int, ...]:
        """The shape of an attention layer's output (the first of a tuple)."""
        meta = node.meta.get("tensor_meta")
        many = isinstance(meta, (tuple, list)) and not hasattr(meta, "shape")  # (out, weights)
        first = meta[0] if many and meta else meta
        return tuple(getattr(first, "shape", ()) or ())

    @staticmethod
    def attention_result(node: torch.fx.Node, chan: _Chan) -> Any:
        """``chan``, or ``[chan, None, ...]`` for a layer that returns a tuple
        (``nn.MultiheadAttention``'s output and attention weights)."""
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list)) and not hasattr(meta, "shape"):
            return [chan] + [None] * (len(meta) - 1)
        return chan

    def conv(self, name: str, mod: nn.Conv2d, src: _Chan, node: torch.fx.Node) -> _Chan:
        if mod.padding_mode != "zeros":
            raise UnsupportedModelError(f"{self.where}: padding_mode {mod.padding_mode!r} is "
                                        "not supported (only 'zeros')")
        if len(src.shape) != 4:
            raise UnsupportedModelError(f"{self.where}: conv input must be (N, C, H, W)")
        self.per_image(src, "a conv")
        layout = self.layout_on(src, 1, "a conv")
        if name in self.seen_modules:
            raise UnsupportedModelError(f"{self.where}: conv {name} is called more than once "
                                        "(shared weights are not supported)")
        shape = shape_of(node)
        if shape is None:
            raise UnsupportedModelError(f"{self.where}: conv output has no shape")
        groups = mod.groups
        depthwise = groups > 1 and groups == mod.in_channels == mod.out_channels
        if depthwise:
            layer = Layer(name, mod, "conv", layout, layout[0].space, depthwise=True,
                          out_layout=layout)
            out = _Chan(layout, shape, axis=1)
        else:
            space = self.new_space(mod.out_channels)
            layer = Layer(name, mod, "conv", layout, space,
                          out_layout=(Segment(space, mod.out_channels),))
            out = _Chan(layer.out_layout, shape, axis=1)
            if groups > 1:  # grouped but not depthwise: keep every channel it touches
                layer.frozen = True
                self.freeze([space] + [s.space for s in layout],
                            f"grouped conv {name} ({groups} groups) is kept whole")
        self.layers.append(layer)
        self.seen_modules[name] = layer
        return out

    def per_image(self, src: _Chan, what: str) -> None:
        """A layer's input must hold one image per row of its first dim (its contributions
        are summed per image); a map whose rows fold positions into the batch (windows
        as samples) cannot be a layer's input."""
        if src.shape[0] != BATCH:
            raise UnsupportedModelError(f"{self.where}: {what} reads rows that fold positions "
                                        "into the batch dim (windows as samples), which the "
                                        "per-image contributions cannot tell apart")

    def linear(self, name: str, mod: nn.Linear, src: _Chan, node: torch.fx.Node,
               shape: tuple[int, ...] | None = None) -> _Chan:
        self.per_image(src, "a linear layer")
        layout = self.layout_on(src, -1, "a linear layer", repeats=True)
        if name in self.seen_modules:
            raise UnsupportedModelError(f"{self.where}: linear {name} is called more than "
                                        "once (shared weights are not supported)")
        shape = shape or shape_of(node)
        if shape is None:
            raise UnsupportedModelError(f"{self.where}: linear output has no shape")
        space = self.new_space(mod.out_features)
        layer = Layer(name, mod, "linear", layout, space,
                      out_layout=(Segment(space, mod.out_features),))
        self.layers.append(layer)
        self.seen_modules[name] = layer
        return _Chan(layer.out_layout, shape, axis=len(shape) - 1)

    def batchnorm(self, name: str, mod: nn.BatchNorm1d | nn.BatchNorm2d, src: _Chan,
                  node: torch.fx.Node) -> _Chan:
        self.check_norm_children(mod, (nn.BatchNorm1d, nn.BatchNorm2d))
        if isinstance(mod, nn.BatchNorm1d):  # (N, C) or (N, C, L): channels on dim 1
            if len(src.shape) not in (2, 3):
                raise UnsupportedModelError(f"{self.where}: BatchNorm1d expects an (N, C) or "
                                            "(N, C, L) input")
            out = _Chan(self.layout_on(src, 1, "BatchNorm1d"), tuple(src.shape), axis=1)
        else:
            out = self.spatial(node, src, "BatchNorm")
        if name in self.norms and self.norms[name] != out.base:
            raise UnsupportedModelError(f"{self.where}: BatchNorm {name} is applied to "
                                        "different channel groups")
        self.norms[name] = out.base
        return out

    def layer_norm(self, src: _Chan, normalized: tuple[int, ...], what: str) -> _Chan:
        k = len(normalized)
        dims = list(range(len(src.shape) - k, len(src.shape)))
        ids = src.full_ids()
        mixed = any(ids.shape[d] > 1 and bool((ids != ids.narrow(d, 0, 1)).any())
                    for d in dims)
        if mixed:  # mean and variance over the channels: removing one changes the others
            self.freeze([s.space for s in src.base], f"{what} normalises over these channels")
        return src

    def check_norm_children(self, mod: nn.Module, plain: tuple[type, ...]) -> None:
        """Refuse a norm subclass (not one of ``plain``) holding submodules other than
        activations or dropout (a timm norm-act layer holds those only)."""
        if type(mod) not in plain and not all(channelwise(m) for m in mod.children()):
            raise UnsupportedModelError(
                f"{self.where}: {type(mod).__name__} holds submodules that are not "
                "activations or dropout; modellego cannot tell what it does to channels")

    def group_norm(self, src: _Chan, what: str) -> _Chan:
        """GroupNorm: mean and variance over each group of channels (and the positions), so
        removing a channel changes the others of its group: its channels are kept whole."""
        if len(src.shape) < 2:
            raise UnsupportedModelError(f"{self.where}: {what} expects an (N, C, ...) input")
        self.freeze([s.space for s in src.base], f"{what} normalises over groups of these "
                                                 "channels")
        return src

    def group_norm_module(self, name: str, mod: nn.GroupNorm, src: _Chan) -> _Chan:
        """A GroupNorm module: its groups are removed whole. A group's statistics are its own
        channels', so removing whole groups leaves the others exactly as they were; the
        channels of a group are tied together, and the module keeps the groups a plan keeps
        (``num_groups`` shrinks). Kept whole instead (as :meth:`group_norm`) with one group,
        with channels that are not laid along dim 1, or with a group that spans two
        channel runs."""
        self.check_norm_children(mod, (nn.GroupNorm,))
        what = f"GroupNorm {name}"
        layout = src.along(1) if len(src.shape) >= 2 else None
        groups = int(mod.num_groups)
        if layout is None or groups == 1 or any(seg.repeat != 1 for seg in layout) or \
                sum(seg.size for seg in layout) != mod.num_channels:
            return self.group_norm(src, what)
        size = int(mod.num_channels) // groups
        runs: list[tuple[Segment, Segment]] = []
        for seg in layout:
            if seg.size % size:  # a group would span two runs
                return self.group_norm(src, what)
            runs += [(Segment(seg.space, size - 1, 1, seg.start + off),
                      Segment(seg.space, size - 1, 1, seg.start + off + 1))
                     for off in range(0, seg.size, size) if size > 1]
        if name in self.group_norms and self.group_norms[name] != layout:
            raise UnsupportedModelError(f"{self.where}: {what} is applied to different "
                                        "channel groups")
        for a, b in runs:  # channel k of a group is kept exactly when channel k + 1 is
            self.couple_runs(a, b)
        self.group_norms[name] = layout
        return src

    def softmax(self, src: _Chan, dim: Any) -> _Chan:
        if not isinstance(dim, int):
            raise UnsupportedModelError(f"{self.where}: softmax without an explicit dim")
        ids = src.full_ids()
        d = dim % ids.dim()
        if ids.shape[d] > 1 and bool((ids != ids.narrow(d, 0, 1)).any()):
            layout = src.along(d)
            if layout is None:  # channels along this dim and others: not the logits
                self.freeze([s.space for s in src.base],
                            f"softmax at {node_name(self.where)[6:-1]} normalises over these "
                            "channels")
            else:  # the logits' softmax is fine; any other is settled in finish()
                self.softmaxes.append((self.where, layout))
        return src

    def record_param(self, name: str, layout: Layout) -> None:
        old = self.params.get(name)
        if old is not None and self.resolved(old) != self.resolved(layout):
            # one parameter along two runs of channels (a class token joining the patch
            # tokens and, later, its own branch): entry i of both is the parameter's i-th,
            # so the two are kept alike
            if sum(s.width for s in old) != sum(s.width for s in layout) or \
                    any(s.repeat != 1 for s in old + layout):
                raise UnsupportedModelError(f"{self.where}: parameter {name} is read with two "
                                            "different channel layouts")
            self.couple_layouts(old, layout)
            return
        self.params[name] = layout

    # -- functions and methods ---------------------------------------------------------
    def call_function(self, node: torch.fx.Node, facts: dict) -> Any:
        target = node.target
        method = node.op == "call_method"
        nodes = [a for a in flat_args(node) if isinstance(a, torch.fx.Node)]
        chans = [a for a in nodes if isinstance(facts.get(a), _Chan)]
        consts = [a for a in nodes if isinstance(facts.get(a), _Const)]
        lists = [a for a in nodes if isinstance(facts.get(a), list)]
        if target is operator.getitem and isinstance(node.args[0], torch.fx.Node) and \
                isinstance(facts.get(node.args[0]), list):
            return facts[node.args[0]][value_of(node.args[1], self.where)]
        if method and target in META_METHODS or target is getattr and \
                node.args[1] in META_ATTRS:
            return None
        if not chans and not consts and not lists:
            if shape_of(node) is not None:  # a tensor made from nothing the model reads
                return _const(None, shape_of(node) or ())
            return None  # arithmetic on sizes, asserts
        if not chans:
            return self.const_op(node, consts, facts)
        if method and target in SHAPE_METHODS or not method and target in SHAPE_FUNCTIONS:
            return self.shape_op(node, self.chan(node.args[0], facts))
        if method and target in SPLIT_METHODS or not method and target in SPLIT_FUNCTIONS:
            return self.split(node, self.chan(node.args[0], facts))
        if target is torch.cat or target is torch.concat or target is torch.stack:
            return self.concat(node, facts)
        if target in REDUCTIONS or method and target in REDUCTION_METHODS:
            return self.reduction(node, self.chan(node.args[0], facts))
        if target in SPATIAL_FUNCTIONS:
            return self.spatial(node, self.chan(node.args[0], facts), target_name(node))
        if target is F.pad:
            return self.pad(node, self.chan(node.args[0], facts))
        if target is F.batch_norm:
            return self.functional_bn(node, facts)
        if target in (F.linear, F.conv2d):
            return self.functional_layer(node, facts)
        if target is F.layer_norm:
            normalized = value_of(node.args[1] if len(node.args) > 1 else
                                node.kwargs["normalized_shape"], self.where)
            return self.layer_norm(self.chan(node.args[0], facts), tuple(normalized),
                                   f"layer_norm at {node.name}")
        if target is F.group_norm:
            return self.group_norm(self.chan(node.args[0], facts), f"group_norm at {node.name}")
        if method and target in CAST_METHODS:
            return self.chan(node.args[0], facts)
        if target in SOFTMAX_FUNCTIONS or method and target in SOFTMAX_METHODS:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.softmax(self.chan(node.args[0], facts), value_of(dim, self.where))
        if target in ELEMENTWISE_FUNCTIONS or method and target in ELEMENTWISE_METHODS:
            return self.elementwise(node, chans, consts, facts)
        if (getattr(target, "__module__", None), getattr(target, "__name__", None)) in \
                WRAPPED_PER_SAMPLE:  # stochastic depth: identity in eval, else per sample
            src = self.chan(node.args[0], facts)
            shape = shape_of(node)
            if shape is None or shape != src.shape:
                raise UnsupportedModelError(f"{self.where}: changes the tensor's shape")
            return src
        if (getattr(target, "__module__", None), getattr(target, "__name__", None)) in \
                WRAPPED_SHAPE:
            return self.replay(node, [self.chan(node.args[0], facts)],
                               lambda v: call_on(node, v[0], self.where))
        if target is getattr:
            raise UnsupportedModelError(f"{self.where}: reads attribute {node.args[1]!r} of a "
                                        "tensor")
        raise UnsupportedModelError(
            f"{self.where}: operation {target_name(node)} is not supported by the channel "
            "graph; supported are conv/linear/norm modules, activations, pooling, "
            "elementwise arithmetic, and reshapes, slices, splits and concatenations")

    def shape_op(self, node: torch.fx.Node, src: _Chan) -> Any:
        """A view, reshape, permute, slice ...: replayed on the channel index, or (where it
        folds positions into the batch) followed by rows of channels."""
        if node.target in ("expand_as", "view_as", "reshape_as"):
            like = shape_of(node) or ()
            return self.replay(node, [src], lambda v: v[0].reshape(v[0].shape[0], *like[1:]))
        try:
            return self.replay(node, [src], lambda v: call_on(node, v[0], self.where))
        except UnsupportedModelError:
            rows = self.rows_intact(node, src)
            if rows is None:
                raise
            return rows

    def pad(self, node: torch.fx.Node, src: _Chan) -> _Chan:
        """``F.pad`` of dims that hold no channels (a channel-last map, as Swin pads its
        windows, or the spatial dims of an (N, C, H, W) map)."""
        pad = value_of(node.args[1] if len(node.args) > 1 else node.kwargs["pad"], self.where)
        padded = {len(src.shape) - 1 - i // 2 for i, p in enumerate(pad) if p}
        shape = shape_of(node)
        if src.ids is None and src.axis is not None and shape is not None and \
                not padded & {0, src.axis}:
            return _Chan(src.base, shape, axis=src.axis)
        if len(src.shape) == 4 and len(pad) <= 4:
            return self.spatial(node, src, "padding")
        raise UnsupportedModelError(f"{self.where}: padding of the channel dim")

    def replay(self, node: torch.fx.Node, srcs: list[_Chan],
               fn: Callable[[list[torch.Tensor]], Any]) -> Any:
        """Run a shape op on the sources' index tensors, with the batch index folded in."""
        total = sum(c.count for c in srcs)
        values, offset = [], 0
        for c in srcs:
            ids = c.full_ids()
            batch = torch.arange(BATCH).view(-1, *[1] * (ids.dim() - 1))
            values.append((ids + offset + total * batch).contiguous())
            offset += c.count
        try:
            result = fn(values)
        except Exception as exc:  # the op refused the index tensor: say which op
            raise UnsupportedModelError(f"{self.where}: could not follow the channels "
                                        f"through this op ({type(exc).__name__}: {exc})"
                                        ) from None
        base = tuple(s for c in srcs for s in c.base)
        meta = node.meta.get("tensor_meta")
        if isinstance(result, torch.Tensor):
            raws, shapes = [result], [getattr(meta, "shape", None)]
        elif isinstance(result, (tuple, list)):
            raws, shapes = list(result), [None] * len(result)
        else:
            raise UnsupportedModelError(f"{self.where}: unexpected result of a shape op")
        outs: list[torch.Tensor] = []
        for r, shape in zip(raws, shapes):
            batch = torch.arange(BATCH).view(-1, *[1] * (r.dim() - 1))
            if r.dim() == 0 or r.shape[0] != BATCH or not bool((r // total == batch).all()):
                raise UnsupportedModelError(f"{self.where}: mixes the batch dim with others; "
                                            "modellego follows channels only within a sample")
            if shape is not None and tuple(r.shape) != tuple(shape):
                raise UnsupportedModelError(f"{self.where}: could not follow the channels "
                                            "through this op")
            outs.append(r[:1] % total)
        if len(srcs) == 1:
            self.constrain(node, srcs[0], outs)
        facts = [self.normalised(base, i, tuple(r.shape)) for i, r in zip(outs, raws)]
        return facts[0] if isinstance(result, torch.Tensor) else facts

    def rows_intact(self, node: torch.fx.Node, src: _Chan) -> _Chan | None:
        """A shape op that moves whole rows of channels (channels on the last dim, which it
        leaves last and whole) but mixes samples with positions, as a window partition
        folds windows into the batch (Swin): each row keeps its channels, so the result
        holds them on its last dim. ``None`` for any other op."""
        shape = shape_of(node)
        last = len(src.shape) - 1
        if shape is None or src.ids is not None or src.axis != last or \
                shape[-1] != src.shape[-1]:
            return None
        op = str(node.target) if node.op == "call_method" else target_name(node)
        args = value_of(list(node.args[1:]), self.where)
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            args = list(args[0])
        if op in ("view", "reshape"):  # row-major: an unchanged last dim keeps rows whole
            sizes = list(node.args[1:])
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
                sizes = list(sizes[0])
            if sizes and isinstance(sizes[-1], int) and sizes[-1] != -1:
                # a component would ask for the source's channel count again
                self.freeze([s.space for s in src.base], f"{op} at {node.name} fixes the "
                                                         "number of these channels")
        elif op == "permute":
            if [d % len(shape) for d in args][-1] != last:
                return None
        elif op in ("transpose", "swapaxes"):
            if last in {d % len(shape) for d in args[:2]}:
                return None
        else:
            return None
        return _Chan(src.base, shape, axis=len(shape) - 1)

    def constrain(self, node: torch.fx.Node, src: _Chan, outs: list[torch.Tensor]) -> None:
        """Make a component's re-run of this op exact. The component runs the same code
        on fewer channels: a ``chunk`` then cuts its own channels in equal parts, and
        ``view(b, g, c // g, h, w)`` splits them into ``g`` groups of ``c' / g``. Both are
        exact when the parts keep the same channels, one to one: tie them. Any other op
        that keeps part of the channels (``x[:, :n]``, ``split`` with sizes, ``narrow``)
        would cut at the source's fixed bounds: freeze those channels."""
        op = str(node.target) if node.op == "call_method" else target_name(node)
        total = src.count
        held = [set(torch.unique(i).tolist()) for i in outs]
        spaces = [s.space for s in src.base]
        if any(len(h) < total for h in held):
            lazies = [self.normalised(src.base, i, tuple(i.shape)) for i in outs]
            if op == "chunk" and len(outs) > 1 and all(
                    c.ids is None and c.count == lazies[0].count for c in lazies):
                for c in lazies[1:]:
                    self.couple_layouts(c.base, lazies[0].base)
                return
            self.freeze(spaces, f"{op} at {node.name} keeps part of these channels at fixed "
                                "bounds")
            return
        if len(outs) != 1:
            return
        before = len(varying_dims(src.full_ids()))
        varying = varying_dims(outs[0])
        sizes = list(node.args[1:]) if op in ("view", "reshape") else []
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = list(sizes[0])
        if len(varying) <= max(before, 1):  # channels moved, not split across more dims
            if len(sizes) == outs[0].dim() and any(
                    isinstance(sizes[d], int) and sizes[d] != -1 for d in varying):
                # e.g. view(b, 512, -1): a component would ask for 512 channels again
                self.freeze(spaces, f"{op} at {node.name} fixes the number of these "
                                    "channels")
            return
        if len(sizes) != outs[0].dim():
            self.freeze(spaces, f"{op} at {node.name} splits these channels across dims")
            return
        free = [d for d in varying if isinstance(sizes[d], torch.fx.Node) or sizes[d] == -1]
        if len(free) != 1:  # which factor shrinks in a component is not known
            self.freeze(spaces, f"{op} at {node.name} splits these channels across dims")
            return
        index = tuple(slice(None) if d in varying else 0 for d in range(outs[0].dim()))
        grid = outs[0][index]
        rows = grid.movedim(varying.index(free[0]), -1).reshape(-1, grid.shape[
            varying.index(free[0])])
        first = _compose(src.base, rows[0].tolist())
        for row in rows[1:]:
            self.couple_layouts(_compose(src.base, row.tolist()), first)

    def split(self, node: torch.fx.Node, src: _Chan) -> list[_Chan]:
        return self.replay(node, [src], lambda v: list(call_on(node, v[0], self.where)))

    def concat(self, node: torch.fx.Node, facts: dict) -> _Chan:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        if not isinstance(parts, (list, tuple)):
            raise UnsupportedModelError(f"{self.where}: expected a list of tensors to "
                                        "concatenate")
        dim = value_of(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0),
                     self.where)
        shape = shape_of(node)
        alongside = self.concat_positions(parts, dim, shape, facts,
                                          node.target is torch.stack)
        if alongside is not None:
            return alongside
        chans = [self.chan(p, facts) for p in parts]
        if node.target is not torch.stack and shape is not None:
            d = dim % len(shape)
            if all(c.ids is None and c.axis == d for c in chans):  # the common case, lazily
                return _Chan(tuple(s for c in chans for s in c.base), shape, axis=d)
        target = cast(Callable[..., torch.Tensor], node.target)
        out = self.replay(node, chans, lambda v: target(v, dim))
        if out.ids is not None:
            raise UnsupportedModelError(
                f"{self.where}: concatenation along dim {dim} of tensors with different "
                "channels is not supported (only along the channel dim)")
        return out

    def concat_positions(self, parts: Sequence[Any], dim: int, shape: tuple[int, ...] | None,
                         facts: dict, stack: bool) -> _Chan | None:
        """A concatenation along a dim that is not the channels' (the token axis of a
        transformer: a class token in front of the patch tokens): every part holds the same
        channels along one other axis, coupled one to one; a parameter among the parts (the
        class token) follows them. ``None`` when the parts are not laid out so."""
        if shape is None:
            return None
        d = dim % len(shape)
        chans: list[_Chan] = [facts[p] for p in parts if isinstance(facts.get(p), _Chan)]
        if not chans or any(c.ids is not None or c.axis is None or
                            c.axis != chans[0].axis for c in chans):
            return None
        axis = chans[0].axis
        assert axis is not None
        if stack:  # a new dim d; the channels' dim moves past it when it is not before
            if len(chans) != len(parts) or any(c.shape != chans[0].shape for c in chans):
                return None
            for c in chans[1:]:
                self.couple_layouts(chans[0].base, c.base)
            return _Chan(chans[0].base, shape, axis=axis + (axis >= d))
        if axis == d:
            return None
        ref = chans[0]
        for c in chans[1:]:
            if c.shape[axis] != ref.shape[axis]:
                return None
            self.couple_layouts(ref.base, c.base)
        for p in parts:
            fact = facts.get(p) if isinstance(p, torch.fx.Node) else None
            if isinstance(fact, _Chan):
                continue
            if not isinstance(fact, _Const) or fact.name is None or fact.axis is None or \
                    fact.axis + len(shape) - fact.ndim != axis or fact.numel != ref.count:
                raise UnsupportedModelError(
                    f"{self.where}: concatenates along dim {d} a tensor that is neither a "
                    "feature map nor a parameter holding one value per channel (a class "
                    "token)")
            self.record_param(fact.name, ref.base)
        return _Chan(ref.base, shape, axis=axis)

    def reduction(self, node: torch.fx.Node, src: _Chan) -> _Chan:
        shape = shape_of(node)
        at = 2 if node.target in NORM_REDUCTIONS else 1  # norm(x, p, dim, keepdim)
        dims: Any = value_of(node.args[at] if len(node.args) > at else node.kwargs.get("dim"),
                           self.where)
        keep = bool(value_of(node.args[at + 1] if len(node.args) > at + 1 else
                           node.kwargs.get("keepdim", False), self.where))
        nd = len(src.shape)
        if dims is None:
            dims = list(range(nd))
        dims = sorted({d % nd for d in ([dims] if isinstance(dims, int) else dims)})
        if shape is None or 0 in dims:
            raise UnsupportedModelError(f"{self.where}: reduction over the batch dim")
        ids = src.full_ids()
        mixed = any(ids.shape[d] > 1 and bool((ids != ids.narrow(d, 0, 1)).any())
                    for d in dims)
        if mixed and keep and src.ids is None and src.axis is not None:
            # a statistic over the channels, broadcast back (GRN's mean response): every
            # channel counts in it, so none can be removed
            self.freeze([s.space for s in src.base], f"{target_name(node)} at {node.name} "
                                                     "takes a statistic over these channels")
            stat = self.new_space(1)
            self.freeze([stat], f"{target_name(node)} at {node.name} is one value per sample")
            return _Chan((Segment(stat, 1),), shape, axis=src.axis)
        if mixed:
            return self.mixing_reduction(node, src, ids, dims, keep, shape)
        for d in reversed(dims):
            ids = ids.narrow(d, 0, 1) if keep else ids.select(d, 0)
        if src.ids is None and src.axis is not None and src.axis not in dims:
            axis = src.axis - (0 if keep else sum(1 for d in dims if d < src.axis))
            return _Chan(src.base, shape, axis=axis)
        return self.normalised(src.base, ids, shape)

    def mixing_reduction(self, node: torch.fx.Node, src: _Chan, ids: torch.Tensor,
                         dims: list[int], keep: bool, shape: tuple[int, ...]) -> _Chan:
        """A reduction that adds up different channels (the branches of a split-attention
        or selective-kernel block, summed): none of them can be removed alone, so they are
        kept whole, and the result's channels, along the one dim where they still vary, are
        a group of their own, kept whole too."""
        for d in reversed(dims):
            ids = ids.narrow(d, 0, 1) if keep else ids.select(d, 0)
        varying = varying_dims(ids)
        if len(varying) != 1:
            raise UnsupportedModelError(f"{self.where}: reduction over the channel dimension "
                                        "(it mixes channels, so none could be removed)")
        axis = varying[0]
        self.freeze([s.space for s in src.base], f"{target_name(node)} at {node.name} adds "
                                                 "up these channels")
        space = self.new_space(shape[axis])
        self.freeze([space], f"{target_name(node)} at {node.name} adds up other channels")
        return _Chan((Segment(space, shape[axis]),), shape, axis=axis)

    def functional_layer(self, node: torch.fx.Node, facts: dict) -> _Chan:
        """``F.linear`` / ``F.conv2d`` on a module's own weight and bias, as a subclass's
        forward calls them (timm's ``Linear``, ``Conv2dSame``): that module's layer."""
        kind = nn.Linear if node.target is F.linear else nn.Conv2d
        args = list(node.args) + [None] * 7
        weight = facts.get(args[1] if args[1] is not None else node.kwargs.get("weight"))
        bias_arg = args[2] if args[2] is not None else node.kwargs.get("bias")
        owner_name = weight.name.rpartition(".")[0] if isinstance(weight, _Const) and \
            weight.name and weight.name.endswith(".weight") else None
        owner = self.modules.get(owner_name) if owner_name is not None else None
        bias = facts.get(bias_arg) if isinstance(bias_arg, torch.fx.Node) else None
        groups = value_of(args[6] if args[6] is not None else node.kwargs.get("groups", 1),
                        self.where) if kind is nn.Conv2d else None
        if owner_name is None or not isinstance(owner, kind) or (
                bias_arg is not None and not (isinstance(bias, _Const) and
                                              bias.name == f"{owner_name}.bias")) or (
                kind is nn.Conv2d and groups != owner.groups):
            raise UnsupportedModelError(
                f"{self.where}: {target_name(node)} on weights that are not those of one "
                f"{kind.__name__} module is not supported")
        src = self.chan(node.args[0], facts)
        if isinstance(owner, nn.Linear):
            return self.linear(owner_name, owner, src, node)
        return self.conv(owner_name, owner, src, node)

    def functional_bn(self, node: torch.fx.Node, facts: dict) -> _Chan:
        src = self.chan(node.args[0], facts)
        out = self.spatial(node, src, "batch_norm")
        for arg in list(node.args[1:5]) + [node.kwargs.get(k) for k in ("weight", "bias")]:
            fact = facts.get(arg) if isinstance(arg, torch.fx.Node) else None
            if isinstance(fact, _Const) and fact.numel != 1:
                if fact.name is None:
                    raise UnsupportedModelError(f"{self.where}: batch_norm reads a constant "
                                                "that is not a parameter of the model")
                self.record_param(fact.name, out.base)
        return out

    def const_op(self, node: torch.fx.Node, consts: list, facts: dict) -> _Const:
        """An op on parameters alone (``gamma.reshape(1, -1, 1, 1)``, ``scale.exp()``)."""
        shape = shape_of(node) or ()
        opaque = _Const(None, -1, None)
        if shape_of(node) is None:
            return opaque if any(facts[c].numel != 1 for c in consts) else _const(None, ())
        big = [facts[c] for c in consts if facts[c].numel != 1]
        if not big:
            return _const(None, shape)
        if len(big) > 1 or big[0].numel == -1:
            return opaque  # two tensors mixed, or one already lost
        elementwise = node.target in ELEMENTWISE_FUNCTIONS or \
            node.op == "call_method" and node.target in ELEMENTWISE_METHODS
        reshape = node.target in ("view", "reshape", "unsqueeze", "squeeze", "flatten") or \
            node.target in (torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten)
        if node.target in (operator.getitem, "__getitem__") and len(node.args) > 1:
            # g[None, :, None, None]: new axes and whole slices move no value
            reshape = reshape or _new_axes_only(node.args[1])
        out = _const(big[0].name, shape)
        if (elementwise or reshape) and out.numel == big[0].numel and out.axis is not None:
            return out
        if node.target in ("expand", "expand_as", "broadcast_to", torch.broadcast_to) and \
                big[0].axis is not None and len(big[0].shape) <= len(shape):
            # cls_token.expand(b, -1, -1): the same values, broadcast along size-1 dims
            mine = (1,) * (len(shape) - len(big[0].shape)) + big[0].shape
            if all(m in (1, n) for m, n in zip(mine, shape)):
                return _Const(big[0].name, big[0].numel, big[0].axis + len(shape) -
                              big[0].ndim, len(shape), mine)
        return opaque

    def elementwise(self, node: torch.fx.Node, chans: list, consts: list,
                    facts: dict) -> _Chan:
        shape = shape_of(node)
        if shape is None:
            raise UnsupportedModelError(f"{self.where}: elementwise op without a tensor "
                                        "result")
        facts_c = [facts[a] for a in chans]
        full = [c for c in facts_c if c.shape == shape]
        # the output's channels are those of an operand of its full shape, else of the
        # operand with the most channels ((N, 1, H, W) * (N, C, 1, 1): the second)
        ref = full[0] if full else max(facts_c, key=lambda c: c.count)
        if len(ref.shape) != len(shape):
            raise UnsupportedModelError(f"{self.where}: broadcasting across tensors of "
                                        "different ranks")
        if ref.shape != shape:
            ref = self.broadcast(ref, shape)
        for other in facts_c:
            if other is not ref:
                self.couple(ref, other, shape)
        for a in consts:
            self.const_operand(ref, facts[a], shape)
        return ref

    def broadcast(self, c: _Chan, shape: tuple[int, ...]) -> _Chan:
        if c.ids is None and c.axis is not None and c.shape[c.axis] == shape[c.axis]:
            return _Chan(c.base, shape, axis=c.axis)
        return self.normalised(c.base, c.full_ids(shape), shape)

    def couple(self, ref: _Chan, other: _Chan, shape: tuple[int, ...]) -> None:
        if len(other.shape) != len(shape):
            raise UnsupportedModelError(f"{self.where}: broadcasting across tensors of "
                                        "different ranks")
        axis = ref.axis
        if ref.ids is None and other.ids is None and axis is not None and \
                other.axis == axis and other.shape[axis] == shape[axis]:
            self.couple_layouts(ref.base, other.base)  # the common case: one to one
            return
        ia, ib = ref.full_ids(shape), other.full_ids(shape)
        nb = other.count
        pairs = torch.unique(ia.reshape(-1) * nb + ib.reshape(-1))
        pa, pb = (pairs // nb).tolist(), (pairs % nb).tolist()
        if nb == 1 or len(set(pb)) == 1:  # one channel broadcast over the others
            seg = _cut(other.base, pb[0], pb[0] + 1)[0]
            if self.size[seg.space] > 1:
                self.freeze([seg.space], f"one channel of it is broadcast over channels at "
                                         f"{node_name(self.where)}")
            return
        if len(set(pa)) == len(pa) == len(set(pb)) == ref.count == other.count:
            pos_a, pos_b = _positions(ref.base), _positions(other.base)
            for x, y in zip(pa, pb):
                (sa, ca), (sb, cb) = pos_a[x], pos_b[y]
                self.couple_runs(Segment(sa, 1, 1, ca), Segment(sb, 1, 1, cb))
            return
        self.freeze([s.space for s in ref.base + other.base],
                    f"{node_name(self.where)} combines these channels many to many")

    def const_operand(self, ref: _Chan, c: _Const, shape: tuple[int, ...]) -> None:
        if c.numel == 1:
            return
        if c.numel == -1:
            raise UnsupportedModelError(f"{self.where}: multiplies or adds a parameter that "
                                        "was indexed, mixed with another or transformed in a "
                                        "way modellego does not follow (new axes, whole "
                                        "slices, reshapes and elementwise ops are followed)")
        if c.axis is None:
            self.positional_operand(ref, c, shape)
            return
        axis = c.axis + len(shape) - c.ndim
        layout = ref.along(axis)
        if layout is None or sum(s.width for s in layout) != c.numel:
            raise UnsupportedModelError(f"{self.where}: a tensor parameter that does not "
                                        "follow the channels")
        if c.name is None:
            raise UnsupportedModelError(f"{self.where}: a per-channel constant that is not a "
                                        "parameter or buffer of the model cannot be sliced")
        self.record_param(c.name, layout)


    def positional_operand(self, ref: _Chan, c: _Const, shape: tuple[int, ...]) -> None:
        """A parameter that varies along positions and channels (a position embedding added
        to the tokens): its channels are those of ``ref``'s channel axis, kept whole (the
        parameter is not sliced)."""
        mine = (1,) * (len(shape) - len(c.shape)) + c.shape if c.shape else ()
        axis = ref.axis
        layout = ref.along(axis) if axis is not None and ref.ids is None else None
        if c.name is None or not mine or layout is None or axis is None or \
                mine[axis] != sum(s.width for s in layout) or mine[0] != 1:
            raise UnsupportedModelError(f"{self.where}: multiplies or adds a tensor "
                                        "parameter that varies along several dims, not along "
                                        "the channels and positions of a feature map")
        self.freeze([s.space for s in layout],
                    f"{c.name} varies along positions and these channels (a position "
                    "embedding); they are kept whole")


def _input_free(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value is computed without the network's input (from constants,
    parameters and buffers only)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder":
            return False
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return True


def _new_axes_only(index: Any) -> bool:
    """Whether an index only adds axes or takes whole dims (``None``, ``:``, ``...``)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or p == slice(None) for p in parts)


def _const(name: str | None, shape: Sequence[int]) -> _Const:
    numel = 1
    for d in shape:
        numel *= d
    big = [i for i, d in enumerate(shape) if d > 1]
    return _Const(name, numel, big[0] if len(big) == 1 else None, len(shape), tuple(shape))


def node_name(where: str) -> str:
    return where.split(" (")[0]


def build_channel_graph(model: nn.Module, input_shape: Sequence[int]) -> ChannelGraph:
    """Trace ``model`` (in eval mode) and work out which channels are coupled.

    ``input_shape`` is ``(C, H, W)`` of one image. Raises :class:`UnsupportedModelError`
    naming the node for any pattern it cannot handle.
    """
    return _Builder(model, input_shape).build()
