"""Relative contribution of input channels to output channels (Model LEGO).

For a convolution with weight ``W`` of shape ``(Q, P_g, kh, kw)`` and an input activation
``a`` of shape ``(B, C_in, H, W)``, the contribution of input channel ``p`` (counted within
the group of output ``q``) to output channel ``q`` for sample ``b`` is the output map that
``p`` alone produces, summed over all output positions, bias excluded::

    s[b, q, p] = sum_{h,w} (W[q, p] * a[b, g(q) * P_g + p])[h, w]

For a linear layer with weight ``(Q, P)`` it is ``s[b, q, p] = W[q, p] * a[b, p]`` (summed
over any extra leading dimensions of the input, e.g. tokens).

Because the convolution is linear, the spatial sum can be moved inside it::

    s[b, q, p] = sum_k W[q, p, k] * U[b, g(q) * P_g + p, k]

where ``k = (i, j)`` runs over kernel taps and ``U[b, c, k]`` is the sum, over all output
positions, of the (zero-padded) input value seen by tap ``k`` — see :func:`tap_sums`. ``U``
costs two small matrix products, and the contraction is a small batched matrix product, so
no ``(B, Q, P, H, W)`` tensor is ever formed.

The profile pass needs only per-class sums of the clamped contributions, and
:func:`layer_class_sums` computes those without even a ``(B, Q, P)`` tensor: block by block
in cache, with taps that see only padding dropped and an exact closed form for one-tap
layers (linear layers, 1x1 convs, 3x3 convs on 1x1 maps).

Memory: besides the returned ``(B, Q, P)`` tensor, the working set is one ``dtype`` copy of
the input plus ``U``-sized tensors. The batch is processed in chunks whose working set
(input copy, partial sums, ``U``, einsum temporaries and the chunk's output) stays below
``max_bytes`` (256 MiB by default); a chunk holds at least one sample. The returned tensor
itself is necessarily ``B * Q * P`` elements.

Everything is computed without autograd, in ``float64`` by default (``layer_class_sums``:
float32 products for float32 inputs, float64 sums).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import accumulate
from typing import cast

import torch
from torch import nn

from modellego.errors import UnsupportedModelError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "accumulate_class_contribution",
    "conv2d_contribution",
    "layer_class_sums",
    "layer_contribution",
    "linear_contribution",
    "minmax_normalize",
    "tap_sums",
]

#: Default bound on the per-chunk working memory of the contribution functions (bytes).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

IntPair = int | Sequence[int]
# Padding accepted by :func:`tap_sums`: an int, ``(ph, pw)`` (symmetric), explicit
# ``((top, bottom), (left, right))``, or the strings ``"valid"`` / ``"same"``.
Padding = int | str | Sequence[int] | Sequence[Sequence[int]]


def _pair(value: IntPair, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
    return values[0], values[1]


def _explicit_padding(
    padding: Padding,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return ``((top, bottom), (left, right))`` zero padding, as ``F.conv2d`` applies it."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' requires stride 1 (as in torch.nn.Conv2d)")
            sides = []
            for k, d in zip(kernel_size, dilation, strict=True):
                total = d * (k - 1)
                before = total // 2  # PyTorch puts the extra pixel, if any, after
                sides.append((before, total - before))
            return sides[0], sides[1]
        raise ValueError(f"padding must be 'same', 'valid' or numbers, got {padding!r}")
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    items: list[int | Sequence[int]] = list(padding)
    pairs = [v for v in items if not isinstance(v, int)]
    pads: tuple[tuple[int, int], tuple[int, int]]
    if len(items) == 2 and len(pairs) == 2:
        (top, bottom), (left, right) = (tuple(int(x) for x in v) for v in pairs)
        pads = ((top, bottom), (left, right))
    else:  # numbers (a pair of ints, or one); anything else fails in _pair
        ph, pw = _pair(cast(Sequence[int], items), "padding")
        pads = ((ph, ph), (pw, pw))
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pads


def _tap_ranges(
    size: int, out_size: int, k: int, stride: int, dilation: int, before: int
) -> list[slice | None]:
    """For each tap along one axis, the slice of *unpadded* input indices it visits.

    Tap ``i`` reads padded index ``i * dilation + stride * o`` for output ``o`` in
    ``[0, out_size)``; indices falling into the zero padding contribute nothing, and the
    remaining ones form one strided range of the unpadded input (``None`` if empty).
    """
    ranges: list[slice | None] = []
    for i in range(k):
        offset = i * dilation - before  # unpadded index read by output 0
        o_first = (-offset + stride - 1) // stride if offset < 0 else 0  # first index >= 0
        o_last = min(out_size - 1, (size - 1 - offset) // stride)
        if o_last < o_first:
            ranges.append(None)
            continue
        start = offset + stride * o_first
        stop = offset + stride * o_last + 1
        ranges.append(slice(start, stop, stride))
    return ranges


def _out_size(size: int, k: int, stride: int, dilation: int, before: int, after: int) -> int:
    return (size + before + after - dilation * (k - 1) - 1) // stride + 1


@torch.no_grad()
def tap_sums(
    inp: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Sum over all output positions of the input value each kernel tap sees.

    ``inp`` has shape ``(B, C, H, W)``. Returns ``U`` of shape ``(B, C, kh * kw)`` with taps
    in row-major order (``k = i * kw + j``, matching ``weight.reshape(Q, P_g, -1)``), where
    ``U[b, c, k]`` is the sum over output positions ``(h, w)`` of the zero-padded input at
    ``(i * dh + sh * h, j * dw + sw * w)``. The result has ``inp``'s dtype. No padded copy
    is made: zero padding is handled by clipping each tap's index range, and the row and
    column sums are two matrix products with 0/1 visit matrices.

    ``padding`` is an int, ``(ph, pw)``, explicit ``((top, bottom), (left, right))``, or
    ``"valid"`` / ``"same"`` (the latter laid out exactly as ``F.conv2d`` does, with the
    odd extra pixel at the bottom/right).
    """
    if inp.dim() != 4:
        raise ValueError(f"tap_sums expects a (B, C, H, W) tensor, got shape {tuple(inp.shape)}")
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1:
        raise ValueError("kernel_size, stride and dilation must be positive")
    (top, bottom), (left, right) = _explicit_padding(padding, (kh, kw), (sh, sw), (dh, dw))
    b, c, h, w = inp.shape
    ho = _out_size(h, kh, sh, dh, top, bottom)
    wo = _out_size(w, kw, sw, dw, left, right)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"input of spatial size {(h, w)} is too small for kernel {(kh, kw)} with "
            f"stride {(sh, sw)}, padding {((top, bottom), (left, right))}, dilation {(dh, dw)}"
        )
    rows, cols, both = _visit_matrices(h, w, (kh, kw), (sh, sw), (dh, dw),
                                       ((top, bottom), (left, right)), inp.dtype, inp.device)
    if both is not None:  # a small map: one product with the (H * W, taps) visit matrix
        return torch.matmul(inp.reshape(b * c, h * w), both).reshape(b, c, kh * kw)
    # U = R x C^T per (sample, channel): R[i, h] = 1 when tap row i visits input row h (and
    # C likewise for columns), so two small matrix products replace kh + kw strided sums.
    u = torch.matmul(torch.matmul(rows, inp), cols.T)
    return u.reshape(b, c, kh * kw)


#: maps of at most this many pixels get their tap sums from one matrix product
_ONE_PRODUCT_PIXELS = 100


@functools.lru_cache(maxsize=512)
def _taps_seeing_data(size: tuple[int, int], kernel: tuple[int, int],
                      stride: tuple[int, int],
                      padding: tuple[tuple[int, int], tuple[int, int]],
                      dilation: tuple[int, int]) -> torch.Tensor:
    """Indices ``i * kw + j`` of the kernel taps that read at least one input pixel (the
    others see only zero padding, e.g. all but the centre of a 3x3 kernel on a 1x1 map).
    Cached per geometry; read-only."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    (top, bottom), (left, right) = padding
    h, w = size
    rows = _tap_ranges(h, _out_size(h, kh, sh, dh, top, bottom), kh, sh, dh, top)
    cols = _tap_ranges(w, _out_size(w, kw, sw, dw, left, right), kw, sw, dw, left)
    return torch.tensor([i * kw + j for i, r in enumerate(rows) for j, c in enumerate(cols)
                         if r is not None and c is not None], dtype=torch.long)


def _visits(ranges: list[slice | None], size: int, dtype: torch.dtype) -> torch.Tensor:
    """0/1 matrix ``(taps, size)``: which input indices along one axis each tap visits."""
    m = torch.zeros((len(ranges), size), dtype=dtype)
    for i, r in enumerate(ranges):
        if r is not None:
            m[i, r] = 1
    return m


@functools.lru_cache(maxsize=512)
def _visit_matrices(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
                    dilation: tuple[int, int],
                    padding: tuple[tuple[int, int], tuple[int, int]], dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                   torch.Tensor | None]:
    """The row and column visit matrices of one conv geometry (``(kh, H)``, ``(kw, W)``)
    and, for a map of at most :data:`_ONE_PRODUCT_PIXELS` pixels, their product
    ``M[(h, w), (i, j)] = R[i, h] * C[j, w]`` of shape ``(H * W, kh * kw)``, which gives the
    tap sums in one matrix product (cheaper there than many tiny batched ones). Cached per
    geometry, dtype and device: a profile pass calls every layer once per chunk. Read-only."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    (top, bottom), (left, right) = padding
    ho = _out_size(h, kh, sh, dh, top, bottom)
    wo = _out_size(w, kw, sw, dw, left, right)
    rows = _visits(_tap_ranges(h, ho, kh, sh, dh, top), h, dtype)
    cols = _visits(_tap_ranges(w, wo, kw, sw, dw, left), w, dtype)
    both = torch.kron(rows, cols).T.contiguous() if h * w <= _ONE_PRODUCT_PIXELS else None
    return rows.to(device), cols.to(device), None if both is None else both.to(device)


def _layer_label(module: nn.Module, name: str | None) -> str:
    kind = type(module).__name__
    return f"layer {name!r} ({kind})" if name else f"a {kind} layer"


def _chunk_size(batch: int, per_sample_bytes: int, max_bytes: int) -> int:
    if batch == 0:
        return 1
    return max(1, min(batch, max_bytes // max(1, per_sample_bytes)))


def _check_conv(inp: torch.Tensor, conv: nn.Module, name: str | None) -> nn.Conv2d:
    """``conv`` itself, once checked to be a zeros-padded Conv2d that can read ``inp``."""
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModelError(
            f"Contribution analysis supports only Conv2d and Linear; got "
            f"{_layer_label(conv, name)}. Use a model built from Conv2d/Linear layers."
        )
    if conv.padding_mode != "zeros":
        raise UnsupportedModelError(
            f"{_layer_label(conv, name).capitalize()} uses padding_mode="
            f"{conv.padding_mode!r}; contribution analysis supports only 'zeros' padding."
        )
    if inp.dim() != 4 or inp.shape[1] != conv.in_channels:
        raise ValueError(
            f"{_layer_label(conv, name)} expects input (B, {conv.in_channels}, H, W), "
            f"got shape {tuple(inp.shape)}"
        )
    return conv


def _check_linear(inp: torch.Tensor, linear: nn.Module, name: str | None) -> None:
    if not isinstance(linear, nn.Linear):
        raise UnsupportedModelError(
            f"linear_contribution needs an nn.Linear; got {_layer_label(linear, name)}."
        )
    if inp.dim() < 2 or inp.shape[-1] != linear.in_features:
        raise ValueError(
            f"{_layer_label(linear, name)} expects input (B, ..., {linear.in_features}), "
            f"got shape {tuple(inp.shape)}"
        )


@torch.no_grad()
def conv2d_contribution(
    inp: torch.Tensor,
    conv: nn.Conv2d,
    *,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Per-sample contribution ``s`` of shape ``(B, Q, P_g)`` for a ``Conv2d`` layer.

    ``inp`` is the layer's input ``(B, C_in, H, W)``. ``s[b, q, p]`` is the spatial sum of
    the output map that input channel ``g(q) * P_g + p`` produces in output channel ``q``
    (bias excluded), so ``s.sum(-1)`` equals the bias-free conv output summed over space.
    Input and weight are cast to ``dtype``. Supports any stride/padding/dilation/groups
    (including depthwise with a channel multiplier) and ``padding='same'/'valid'``; only
    ``padding_mode='zeros'``. The batch is chunked so each chunk's working memory stays
    under ``max_bytes`` (the returned tensor is always ``B * Q * P_g`` elements).
    """
    _check_conv(inp, conv, name)
    groups = conv.groups
    q_total, p_g, kh, kw = conv.weight.shape
    q_g = q_total // groups
    taps = kh * kw
    (top, bottom), (left, right) = _explicit_padding(
        conv.padding, (kh, kw), _pair(conv.stride, "stride"), _pair(conv.dilation, "dilation")
    )
    padding = ((top, bottom), (left, right))

    weight = conv.weight.detach().to(device=inp.device, dtype=dtype)
    weight = weight.reshape(groups, q_g, p_g, taps)

    batch, c_in, h, w = inp.shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    # input copy + row sums + U + einsum output and its permuted copy
    per_sample = itemsize * (c_in * h * w + c_in * kh * w + c_in * taps + 2 * q_total * p_g)
    chunk = _chunk_size(batch, per_sample, max_bytes)

    out = torch.empty((batch, q_total, p_g), dtype=dtype, device=inp.device)
    for start in range(0, batch, chunk):
        x = inp[start : start + chunk].detach().to(dtype)
        u = tap_sums(x, (kh, kw), conv.stride, padding, conv.dilation)
        u = u.reshape(x.shape[0], groups, p_g, taps)
        s = torch.einsum("gqpk,bgpk->bgqp", weight, u)
        out[start : start + chunk] = s.reshape(x.shape[0], q_total, p_g)
    return out


@torch.no_grad()
def linear_contribution(
    inp: torch.Tensor,
    linear: nn.Linear,
    *,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Per-sample contribution ``s[b, q, p] = W[q, p] * a[b, p]`` of shape ``(B, Q, P)``.

    ``inp`` is ``(B, P)`` or ``(B, ..., P)``; extra middle dimensions (e.g. tokens) are
    summed over, since the contribution is linear in the input. Bias excluded.
    """
    _check_linear(inp, linear, name)
    batch = inp.shape[0]
    q, p = linear.weight.shape
    weight = linear.weight.detach().to(device=inp.device, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = itemsize * (inp[0].numel() + q * p)
    chunk = _chunk_size(batch, per_sample, max_bytes)

    out = torch.empty((batch, q, p), dtype=dtype, device=inp.device)
    for start in range(0, batch, chunk):
        x = inp[start : start + chunk].detach().to(dtype)
        if x.dim() > 2:
            x = x.reshape(x.shape[0], -1, p).sum(dim=1)
        torch.mul(weight.unsqueeze(0), x.unsqueeze(1), out=out[start : start + chunk])
    return out


def layer_contribution(
    inp: torch.Tensor,
    module: nn.Module,
    *,
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Dispatch to :func:`conv2d_contribution` or :func:`linear_contribution`.

    Raises :class:`~modellego.errors.UnsupportedModelError` (mentioning ``name`` if given)
    for any other module type, including Conv1d/Conv3d and transposed convolutions.
    """
    if isinstance(module, nn.Conv2d):
        return conv2d_contribution(inp, module, dtype=dtype, name=name, max_bytes=max_bytes)
    if isinstance(module, nn.Linear):
        return linear_contribution(inp, module, dtype=dtype, name=name, max_bytes=max_bytes)
    raise UnsupportedModelError(
        f"Contribution analysis supports only Conv2d and Linear layers; got "
        f"{_layer_label(module, name)}. Exclude it from the analysed layers or replace it."
    )


@torch.no_grad()
def accumulate_class_contribution(
    contrib: torch.Tensor, labels: torch.Tensor, num_classes: int, *, inplace: bool = False
) -> torch.Tensor:
    """Sum per-sample contributions by class, after clamping each sample's values at 0.

    ``contrib`` is ``(B, Q, P)`` (already summed over space), ``labels`` is ``(B,)`` of
    class indices in ``[0, num_classes)``. Returns ``S`` of shape ``(num_classes, Q, P)``
    in float64 with ``S[c] = sum_{b: labels[b] == c} clamp(contrib[b], min=0)``. Clamping
    happens per sample, before summing. Add the results of several batches to accumulate
    over a dataset. ``inplace=True`` lets a float64 ``contrib`` be clamped in place (saves a
    copy of the largest tensor of a profile pass).

    The per-class sum is one matrix product of a one-hot ``(num_classes, B)`` matrix with
    the ``(B, Q * P)`` slab: far faster than a scatter on the CPU, and as deterministic.
    """
    if contrib.dim() < 1:
        raise ValueError("contrib must have a leading batch dimension")
    labels = labels.reshape(-1).to(device=contrib.device, dtype=torch.long)
    if labels.numel() != contrib.shape[0]:
        raise ValueError(
            f"got {labels.numel()} labels for a batch of {contrib.shape[0]} contributions"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}); got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    clamped = contrib.detach()
    if clamped.dtype == torch.float64 and inplace:
        clamped = clamped.clamp_(min=0)
    else:
        clamped = clamped.to(torch.float64).clamp(min=0)
    batch = clamped.shape[0]
    onehot = torch.zeros(num_classes, batch, dtype=torch.float64, device=contrib.device)
    onehot[labels, torch.arange(batch, device=contrib.device)] = 1.0
    return (onehot @ clamped.reshape(batch, -1)).reshape(num_classes, *contrib.shape[1:])


#: Bound on one block of per-sample contributions in :func:`layer_class_sums` (bytes): small
#: enough to stay in a core's cache between the product, the clamp and the class sums.
_BLOCK_BYTES = 1 << 21


def _row_sums(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[r] = sum_{b: rows[b] == r} values[b]`` in float64 (one matrix product)."""
    onehot = torch.zeros(num_rows, len(rows), dtype=torch.float64, device=values.device)
    onehot[rows, torch.arange(len(rows), device=values.device)] = 1.0
    return (onehot @ values.reshape(len(rows), -1).double()).reshape(num_rows,
                                                                      *values.shape[1:])


def _one_tap_sums(u: torch.Tensor, w_pos: torch.Tensor, w_neg: torch.Tensor,
                  rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Class sums when each ``(q, p)`` has a single product ``w[.., q, p] * u[b, .., p]``.

    ``max(w * u, 0) = max(w, 0) * max(u, 0) + max(-w, 0) * max(-u, 0)`` exactly, so the sum
    over samples needs only the per-class sums of the positive and negative parts of ``u``.
    ``u`` is ``(B, G, P)``; ``w_pos`` and ``w_neg`` are ``max(w, 0)`` and ``max(-w, 0)`` of
    ``w`` ``(G, Q, P)`` in float64; returns ``(num_rows, G, Q, P)``.
    """
    pos = _row_sums(u.clamp(min=0), rows, num_rows).unsqueeze(2)
    neg = _row_sums((-u).clamp(min=0), rows, num_rows).unsqueeze(2)
    out = w_pos.unsqueeze(0) * pos
    return out.add_(w_neg.unsqueeze(0) * neg)  # in place: one (rows, G, Q, P) buffer less


def _signed_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` in float64 with its positive and negative parts."""
    w = w.double()
    return w, w.clamp(min=0), (-w).clamp(min=0)


#: what :func:`layer_class_sums` derives from a layer's weight for one input geometry
_Derived = tuple[torch.Tensor, ...]


def _derived(cache: dict | None, key: tuple, make) -> _Derived:
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


@torch.no_grad()
def layer_class_sums(
    inp: torch.Tensor,
    module: nn.Module,
    rows: torch.Tensor,
    num_rows: int,
    *,
    name: str | None = None,
    cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of clamped contributions, without a ``(B, Q, P)`` tensor in memory.

    ``rows`` gives each sample's class row in ``[0, num_rows)``. Returns ``(sums, signed)``
    in float64: ``sums[r] = sum_{b: rows[b] == r} max(s[b], 0)`` of shape
    ``(num_rows, Q, P_g)`` and ``signed = sum_b s[b]`` of shape ``(Q, P_g)``, where ``s`` is
    :func:`layer_contribution`'s per-sample contribution (so this equals
    ``accumulate_class_contribution(layer_contribution(...))``).

    How it stays cheap: the signed sum is linear, so it is the weights times the batch sum
    of the tap sums ``U``. Kernel taps that see only zeros in the whole batch (e.g. the
    padding ring of a 1x1 map) are dropped. A linear layer, or a conv left with one tap,
    has one product per ``(q, p)`` and an exact closed form (:func:`_one_tap_sums`, float64
    throughout). Otherwise the per-sample products are batched matrix products over
    ``(p, sample, tap) x (p, tap, q)`` in the input's precision (float32 for a float32
    model), made block by block so a block stays in cache while it is clamped and summed
    over each class's samples; block sums are accumulated in float64.

    ``cache``: a dict the caller keeps for as long as the layer's weights do not change (a
    profile pass keeps one for all its chunks); the weight layouts derived for the products
    are stored there instead of being made again on every call.
    """
    if isinstance(module, nn.Linear):
        return _linear_class_sums(inp, module, rows, num_rows, name, cache)
    conv = _check_conv(inp, module, name)
    groups = conv.groups
    q_total, p_g, kh, kw = conv.weight.shape
    q_g = q_total // groups
    dtype = torch.promote_types(inp.dtype, torch.float32)
    padding = _explicit_padding(conv.padding, (kh, kw), _pair(conv.stride, "stride"),
                                _pair(conv.dilation, "dilation"))
    batch = inp.shape[0]
    u = tap_sums(inp.detach().to(dtype), (kh, kw), conv.stride, padding, conv.dilation)
    u = u.reshape(batch, groups, p_g, kh * kw)
    used = _taps_seeing_data((inp.shape[2], inp.shape[3]), (kh, kw),
                             _pair(conv.stride, "stride"), padding,
                             _pair(conv.dilation, "dilation"))
    taps = len(used)
    if taps < kh * kw:  # taps that only ever see padding contribute exactly nothing
        u = u[..., used]

    def weights() -> _Derived:
        weight = conv.weight.detach().to(dtype).reshape(groups, q_g, p_g, kh * kw)
        if taps < kh * kw:
            weight = weight[..., used]
        if taps == 1:
            return _signed_parts(weight[..., 0])
        # (G * P_g, taps, Q_g): per input channel, for the sample-major products below
        wt = weight.permute(0, 2, 3, 1).reshape(groups * p_g, taps, q_g).contiguous()
        return weight.double(), wt

    derived = _derived(cache, (id(module), dtype, tuple(used.tolist())), weights)
    signed = torch.einsum("gqpk,gpk->gqp", derived[0].reshape(groups, q_g, p_g, -1),
                          u.sum(0, dtype=torch.float64))
    signed = signed.reshape(q_total, p_g)
    if taps <= 1:
        if taps == 0:
            return torch.zeros((num_rows, q_total, p_g), dtype=torch.float64,
                               device=inp.device), signed
        sums = _one_tap_sums(u[..., 0].double(), derived[1], derived[2], rows, num_rows)
        return sums.reshape(num_rows, q_total, p_g), signed
    return _blocked_class_sums(u, derived[1], rows, num_rows), signed


def _linear_class_sums(inp: torch.Tensor, module: nn.Linear, rows: torch.Tensor,
                       num_rows: int, name: str | None, cache: dict | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`layer_class_sums` of a linear layer: one product per ``(q, p)``, in closed
    form (the input summed over every axis but the batch and the last)."""
    _check_linear(inp, module, name)
    x = inp.detach()
    if x.dim() > 2:
        x = x.reshape(x.shape[0], -1, x.shape[-1]).sum(dim=1)
    x = x.double()
    w, w_pos, w_neg = _derived(cache, (id(module), "linear"),
                               lambda: _signed_parts(module.weight.detach()))
    sums = _one_tap_sums(x.unsqueeze(1), w_pos.unsqueeze(0), w_neg.unsqueeze(0), rows,
                         num_rows)[:, 0]
    return sums, w * x.sum(0)


def _blocked_class_sums(u: torch.Tensor, wt: torch.Tensor, rows: torch.Tensor,
                        num_rows: int) -> torch.Tensor:
    """Per-class sums of the clamped per-sample products of tap sums ``u`` (batch, groups,
    P_g, taps) with weights ``wt`` (groups * P_g, taps, Q_g), block by block (see
    :func:`layer_class_sums`); ``(num_rows, groups * Q_g, P_g)`` in float64."""
    batch, groups, p_g, taps = u.shape
    q_g = wt.shape[2]
    if len(rows) > 1 and bool((rows[1:] < rows[:-1]).any()):
        u = u[torch.sort(rows, stable=True).indices]  # each class's samples contiguous
    counts = torch.bincount(rows, minlength=num_rows).tolist()
    spans = [(r, end - n, end) for r, (n, end) in enumerate(zip(counts, accumulate(counts)))
             if n]
    # (G * P_g, B, taps) x (G * P_g, taps, Q_g): sample-major per input channel
    ut = u.permute(1, 2, 0, 3).reshape(groups * p_g, batch, taps)
    # laid out as returned, (rows, G, Q_g, P_g): callers add it to their totals, and adding a
    # transposed view costs several times a contiguous one
    acc = torch.zeros((num_rows, groups, q_g, p_g), dtype=torch.float64, device=u.device)
    step = max(1, _BLOCK_BYTES // (batch * q_g * ut.element_size()))
    # blocks of whole groups when a group fits in one, else blocks within a group
    per_block = max(1, step // p_g)
    width = p_g if step >= p_g else step
    for g0 in range(0, groups, per_block):
        g1 = min(groups, g0 + per_block)
        for a in range(0, p_g, width):
            b = min(p_g, a + width)
            j, n = g0 * p_g + a, (g1 - g0) * (b - a)  # whole groups: a = 0, b = p_g
            block = torch.bmm(ut[j:j + n], wt[j:j + n]).clamp_(min=0)
            for r, start, stop in spans:  # each (row, block) slot is written once
                part = block[:, start:stop].sum(1)  # (input channels, Q_g)
                acc[r, g0:g1, :, a:b] = part.reshape(g1 - g0, b - a, q_g).transpose(1, 2)
    return acc.reshape(num_rows, groups * q_g, p_g)


def minmax_normalize(S: torch.Tensor, dim: int = -1, eps: float = 1e-5) -> torch.Tensor:
    """``(S - min) / (max - min + eps)`` with min and max taken over ``dim``."""
    lo = S.amin(dim=dim, keepdim=True)
    hi = S.amax(dim=dim, keepdim=True)
    return (S - lo) / (hi - lo + eps)
