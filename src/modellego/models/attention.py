"""Multi-head self-attention whose heads can be removed, and the attention layers of other
libraries it can stand for.

:class:`HeadAttention` computes standard multi-head self-attention over tokens ``(B, N, C)``:
one ``qkv`` projection (rows ``q | k | v``, heads in order within each part), per head
``softmax(q kᵀ · scale) v`` (optionally after a per-head norm of ``q`` and ``k``), and an
output projection ``proj`` over the heads' concatenated outputs. It reads its head count
from ``qkv``'s rows, so a component with fewer heads is the same class with ``qkv`` rows and
``proj`` columns sliced (see :func:`keep_heads`).

:func:`as_head_attention` recognises another library's attention layer (timm's
``Attention`` and those built like it; BEiT's, with a relative-position bias per head, as a
:class:`RelPosHeadAttention`) and returns a :class:`HeadAttention` over the *same* ``qkv``
weight and ``proj`` module, but only after checking on random tokens that both compute the
same thing; a layer that does something else (a norm over all heads, a gate, masks) is not
taken for one, and the channel graph keeps it whole. :func:`self_attention_layers` converts
the attention layers of torchvision's ViT, Swin (V1, V2) and MaxViT, in place, into classes
with the same parameters and results whose heads can be removed.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanError

#: relative tolerance of the float64 check that a layer is standard attention
MATCH_TOL = 1e-9


def _per_head_bias(table: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``(1, heads, n, n)``: each head's bias for each pair of ``n`` positions, ``table``
    ``(distances, heads)`` read at ``index`` (``n x n`` entries, flat or not: the
    relative-position bias of Swin's, BEiT's and MaxViT's attention)."""
    bias = table[index.reshape(-1)]
    return bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)


class HeadAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, dim)`` tokens with heads of ``head_dim``.

    The head count is ``qkv.out_features // (3 * head_dim)``; ``scale`` defaults to
    ``head_dim ** -0.5``; ``q_norm``/``k_norm`` act on each head's ``head_dim`` features.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 out_dim: int | None = None, scale: float | None = None) -> None:
        super().__init__()
        if min(dim, num_heads, head_dim) < 1:
            raise ValueError("dim, num_heads and head_dim must be >= 1")
        self.head_dim = int(head_dim)
        self.scale = float(scale) if scale is not None else self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.proj = nn.Linear(num_heads * head_dim, out_dim or dim)

    @property
    def num_heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """Self-attention over ``x`` (``attn_mask``/``is_causal`` as in
        ``F.scaled_dot_product_attention``, and as timm's attention layers take them)."""
        q, k, v = self.project(x)
        return self.attend(q, k, v, attn_mask, is_causal)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each head's (normed) queries, keys and values: ``(B, heads, N, head_dim)``."""
        b, n, _ = x.shape
        heads = self.qkv.out_features // (3 * self.head_dim)
        qkv = self.qkv(x).reshape(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """The heads' attention over their ``(B, heads, N, head_dim)`` queries, keys and
        values, through the output projection."""
        b, heads, n, d = q.shape
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             scale=self.scale)
        return self.proj(ctx.transpose(1, 2).reshape(b, n, heads * d))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:.6g}"


class RelPosHeadAttention(HeadAttention):
    """A :class:`HeadAttention` whose heads each add a learned relative-position bias to
    their logits (BEiT's attention): ``relative_position_bias_table`` ``(distances, heads)``
    read at ``relative_position_index`` ``(N, N)`` for ``N`` tokens; a bias given by the caller
    (``shared_rel_pos_bias``, ``attn_mask``) is added too. Removing a head removes its column
    of the table."""

    relative_position_bias_table: nn.Parameter
    relative_position_index: torch.Tensor

    def position_bias(self) -> torch.Tensor:
        """``(1, heads, N, N)``: each head's bias for each pair of tokens."""
        return _per_head_bias(self.relative_position_bias_table, self.relative_position_index,
                             self.relative_position_index.shape[0])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, shared_rel_pos_bias: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`HeadAttention.forward`, with BEiT's ``shared_rel_pos_bias`` and Swin's
        window ``mask`` (``(windows, N, N)``, added to the rows of each image's windows in
        turn, the windows folded into the batch)."""
        bias = self.position_bias()
        if mask is not None:
            bias = bias + mask.repeat(x.shape[0] // mask.shape[0], 1, 1).unsqueeze(1)
        for extra in (shared_rel_pos_bias, attn_mask):
            if extra is not None:
                bias = bias + extra
        return super().forward(x, attn_mask=bias, is_causal=is_causal)


class RopeHeadAttention(HeadAttention):
    """A :class:`HeadAttention` whose queries and keys (but the first
    ``num_prefix_tokens``) are rotated by the rotary position embedding the caller gives
    (``rope``: sines and cosines side by side, one row per token; timm's EVA): the same
    rotation for every head, so heads can be removed as in any other."""

    num_prefix_tokens: int
    rotate_half: bool

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, rope: torch.Tensor | None = None) -> torch.Tensor:
        """As :meth:`HeadAttention.forward`, the queries and keys rotated by ``rope``
        (given by keyword, as EVA's blocks give it)."""
        q, k, v = self.project(x)
        if rope is not None:
            from timm.layers import apply_rot_embed_cat  # (only timm's layers take a rope)

            npt = self.num_prefix_tokens
            q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope,
                                                                  half=self.rotate_half)],
                              dim=2).type_as(v) for t in (q, k))
        return self.attend(q, k, v, attn_mask, is_causal)


def takes_rope(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes a rotary position embedding ``rope`` (timm's EVA
    attention, and the :class:`RopeHeadAttention` that stands for it)."""
    try:
        return "rope" in inspect.signature(module.forward).parameters and \
            isinstance(getattr(module, "num_prefix_tokens", None), int)
    except (TypeError, ValueError):
        return False


class SelfAttentionMHA(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention — query, key and value the same
    batch-first tensor, no masks, no attention weights asked for, no dropout at work — runs
    its output projection as a module call and reads its head count from
    ``in_proj_weight``'s rows, so heads can be removed; every other call is
    ``nn.MultiheadAttention``'s own. :func:`self_attention_layers` gives the layers of a
    network this class (same parameters, same results)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        heads = self.in_proj_weight.shape[0] // (3 * self.head_dim) \
            if self.in_proj_weight is not None else self.num_heads
        plain = query is key and key is value and self.batch_first and query.dim() == 3 \
            and key_padding_mask is None and attn_mask is None and not need_weights \
            and not is_causal and self.bias_k is None and not self.add_zero_attn \
            and self._qkv_same_embed_dim and not (self.training and self.dropout > 0)
        if not plain:
            if heads * self.head_dim != self.embed_dim:
                raise ValueError("an attention layer with removed heads computes plain "
                                 "self-attention only (query, key and value the same "
                                 "batch-first tensor, no masks, need_weights=False)")
            return super().forward(query, key, value, key_padding_mask, need_weights,
                                   attn_mask, average_attn_weights, is_causal)
        b, n, _ = query.shape
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, n, heads * self.head_dim)), None


class WindowHeadAttention(nn.Module):
    """torchvision's Swin (V1) shifted-window attention (``ShiftedWindowAttention``, whose
    parameters and buffers it takes over) with any number of heads of ``head_dim``, read
    from ``qkv``'s rows, and its output projection called as a module on the ``(B, H, W,
    heads * head_dim)`` map once the windows are put back (a per-token layer, so the same
    values), so heads can be removed like any other attention layer's.

    Over ``(B, H, W, C)``: pad to whole windows, shift by ``shift_size`` (when the map is
    larger than a window), attend within each window with the relative-position bias of
    each head (and, shifted, a mask between the regions the shift brought together), then
    undo the windows, the shift and the padding."""

    head_dim: int
    window_size: list[int]
    shift_size: list[int]
    attention_dropout: float
    dropout: float
    qkv: nn.Linear
    proj: nn.Linear
    relative_position_bias_table: nn.Parameter
    relative_position_index: torch.Tensor

    @property
    def heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        (wh, ww), d, heads = self.window_size, self.head_dim, self.heads
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        ph, pw = x.shape[1], x.shape[2]
        sh = self.shift_size[0] if wh < ph else 0
        sw = self.shift_size[1] if ww < pw else 0
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        rows, cols, n = ph // wh, pw // ww, wh * ww
        windows = x.view(b, rows, wh, cols, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        q, k, v = self.qkv(windows).reshape(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
        attn = self.logits(q, k) + self.position_bias(n)
        if sh or sw:
            attn = (attn.view(b, rows * cols, heads, n, n) +
                    self.shift_mask(ph, pw, sh, sw, x).unsqueeze(1)).view(-1, heads, n, n)
        attn = F.dropout(attn.softmax(-1), self.attention_dropout, self.training)
        ctx = (attn @ v).transpose(1, 2).reshape(b, rows, cols, wh, ww, heads * d)
        ctx = ctx.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, heads * d)
        if sh or sw:
            ctx = torch.roll(ctx, shifts=(sh, sw), dims=(1, 2))
        out = self.proj(ctx[:, :h, :w].contiguous())
        return F.dropout(out, self.dropout, self.training)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Each head's attention logits within a window, before the position bias."""
        return (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)

    def position_bias(self, n: int) -> torch.Tensor:
        """``(1, heads, n, n)``: each head's bias for each pair of positions in a window."""
        return _per_head_bias(self.relative_position_bias_table, self.relative_position_index, n)

    def shift_mask(self, ph: int, pw: int, sh: int, sw: int, like: torch.Tensor
                   ) -> torch.Tensor:
        """``(windows, n, n)``: -100 between positions of a window that the shift brought
        from different regions of the map, 0 elsewhere."""
        wh, ww = self.window_size

        def bands(size: int, window: int, shift: int) -> torch.Tensor:
            band = torch.zeros(size, dtype=torch.long, device=like.device)
            if shift:
                band[size - window:size - shift] = 1
                band[size - shift:] = 2
            return band

        region = bands(ph, wh, sh)[:, None] * 3 + bands(pw, ww, sw)[None, :]
        region = region.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        differ = region.unsqueeze(1) != region.unsqueeze(2)
        return torch.zeros(differ.shape, dtype=like.dtype, device=like.device) \
            .masked_fill(differ, -100.0)


class WindowHeadAttentionV2(WindowHeadAttention):
    """torchvision's Swin V2 shifted-window attention (``ShiftedWindowAttentionV2``) as a
    :class:`WindowHeadAttention`: cosine attention scaled by each head's learned
    ``logit_scale`` (at most 100), and each head's position bias ``16 sigmoid(.)`` of one
    output of ``cpb_mlp`` over the relative coordinates. Removing a head removes its q, k
    and v rows, its ``logit_scale`` and its row of the MLP's last layer.

    torchvision ignores the key part of ``qkv``'s bias (it computes with zeros there);
    :func:`self_attention_layers` sets those values to zero when it converts a layer, so the
    bias is used as it stands."""

    logit_scale: nn.Parameter
    cpb_mlp: nn.Sequential
    relative_coords_table: torch.Tensor

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()

    def position_bias(self, n: int) -> torch.Tensor:
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.heads)
        return 16 * torch.sigmoid(_per_head_bias(table, self.relative_position_index, n))


class GridHeadAttention(nn.Module):
    """torchvision's MaxViT attention (``RelativePositionalMultiHeadAttention``, whose
    parameters and buffers it takes over) over ``(B, G, P, D)``: ``G`` groups (windows or
    grid cells, one image's) of ``P`` tokens attend within each group, each head adding its
    column of the relative-position bias table; the head count is read from ``to_qkv``'s
    rows, so heads can be removed (``scale_factor`` stays the source's)."""

    head_dim: int
    n_heads: int
    scale_factor: float
    max_seq_len: int
    to_qkv: nn.Linear
    merge: nn.Linear
    relative_position_bias_table: nn.Parameter
    relative_position_index: torch.Tensor

    @property
    def heads(self) -> int:
        return self.to_qkv.out_features // (3 * self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        h, dh = self.heads, self.head_dim
        q, k, v = (t.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)
                   for t in torch.chunk(self.to_qkv(x), 3, dim=-1))
        k = k * self.scale_factor
        dot = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        dot = F.softmax(dot + self.position_bias(), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, h * dh))

    def position_bias(self) -> torch.Tensor:
        """``(1, heads, P, P)``: each head's bias for each pair of positions in a group."""
        return _per_head_bias(self.relative_position_bias_table, self.relative_position_index,
                             self.max_seq_len)


#: (module, class name) of the attention layers :func:`self_attention_layers` converts
#: (besides ``nn.MultiheadAttention``), and the class each becomes
_CONVERTED: dict[tuple[str, str], type[nn.Module]] = {
    ("torchvision.models.swin_transformer", "ShiftedWindowAttention"): WindowHeadAttention,
    ("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"): WindowHeadAttentionV2,
    ("torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"): GridHeadAttention,
}


def self_attention_layers(model: nn.Module) -> nn.Module:
    """``model`` with its attention layers made ones whose heads can be removed, in place
    (the same modules, parameters and results): every ``nn.MultiheadAttention`` (the class
    itself) a :class:`SelfAttentionMHA`, every torchvision Swin ``ShiftedWindowAttention``
    a :class:`WindowHeadAttention`, every ``ShiftedWindowAttentionV2`` a
    :class:`WindowHeadAttentionV2` and every MaxViT ``RelativePositionalMultiHeadAttention``
    a :class:`GridHeadAttention`."""
    for m in model.modules():
        if type(m) is nn.MultiheadAttention:
            m.__class__ = SelfAttentionMHA
            continue
        cls = _CONVERTED.get((type(m).__module__, type(m).__name__))
        if cls is None:
            continue
        if cls is GridHeadAttention:
            m.__class__ = cls
            continue
        qkv, heads = cast(nn.Linear, m.qkv), cast(int, m.num_heads)
        m.__dict__["head_dim"] = qkv.in_features // heads
        if cls is WindowHeadAttentionV2 and qkv.bias is not None:
            _zero_key_bias(m)
            # (and after every state dict loaded into it: a file may hold other values)
            m.register_load_state_dict_post_hook(_zero_key_bias_after_load)
        m.__class__ = cls
    return model


def _zero_key_bias_after_load(module: nn.Module, incompatible_keys: object) -> None:
    _zero_key_bias(module)


def _zero_key_bias(module: nn.Module) -> None:
    """Set the key part of ``module.qkv``'s bias to zero: torchvision's Swin V2 computes
    with zeros there whatever the parameter holds."""
    bias = cast(nn.Linear, module.qkv).bias
    if bias is not None:
        with torch.no_grad():
            third = bias.numel() // 3
            bias[third:2 * third] = 0


@dataclass(frozen=True)
class Heads:
    """How an attention layer's heads are laid out: ``count`` heads of ``dim`` features
    each, read by the output projection ``proj`` (a linear layer called as a module)."""

    count: int
    dim: int
    proj: nn.Linear
    #: the q, k and v projection's weight, ``(3 * count * dim, inputs)``: rows ``q | k | v``
    qkv_weight: torch.Tensor

    def filters(self) -> torch.Tensor:
        """One row per head: its q, k and v rows side by side (what writes the head)."""
        w = self.qkv_weight.reshape(3, self.count, self.dim, -1)
        return w.permute(1, 0, 2, 3).reshape(self.count, -1)


def heads_of(module: nn.Module) -> Heads | None:
    """The heads of an attention layer whose heads can be removed (a
    :class:`HeadAttention`, a layer :func:`as_head_attention` takes for one, or a
    :class:`SelfAttentionMHA`); ``None`` for any other module."""
    if isinstance(module, SelfAttentionMHA):
        if not module._qkv_same_embed_dim or module.in_proj_weight is None:
            return None
        rows = module.in_proj_weight.shape[0]
        return Heads(rows // (3 * module.head_dim), module.head_dim, module.out_proj,
                     module.in_proj_weight)
    if isinstance(module, WindowHeadAttention):
        return Heads(module.heads, module.head_dim, module.proj, module.qkv.weight)
    if isinstance(module, GridHeadAttention):
        return Heads(module.heads, module.head_dim, module.merge, module.to_qkv.weight)
    attn = as_head_attention(module)
    if attn is None:
        return None
    return Heads(attn.num_heads, attn.head_dim, attn.proj, attn.qkv.weight)


def _candidate(module: nn.Module) -> HeadAttention | None:
    """A :class:`HeadAttention` over ``module``'s own ``qkv`` and ``proj`` when it is built
    like one (attributes only; :func:`as_head_attention` checks what it computes)."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads = getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and isinstance(heads, int) and heads >= 1):
        return None
    if qkv.out_features % (3 * heads) or proj.in_features * 3 != qkv.out_features:
        return None
    head_dim = qkv.out_features // (3 * heads)
    if getattr(module, "head_dim", head_dim) != head_dim:
        return None
    if getattr(module, "gate", None) is not None:
        return None
    for attr in ("norm", "scale_norm"):  # a norm over all heads together mixes them
        if not isinstance(getattr(module, attr, nn.Identity()), nn.Identity):
            return None
    scale = getattr(module, "scale", head_dim ** -0.5)
    if not isinstance(scale, (int, float)):
        return None
    qkv = _with_separate_bias(module, qkv)
    table = getattr(module, "relative_position_bias_table", None)
    index = getattr(module, "relative_position_index", None)
    if qkv is None or (table is None) != (index is None):
        return None
    if table is not None and not (isinstance(table, nn.Parameter) and table.dim() == 2 and
                                  table.shape[1] == heads and isinstance(index, torch.Tensor)
                                  and index.dim() == 2 and index.shape[0] == index.shape[1]):
        return None
    rope = takes_rope(module)
    if table is not None and rope:
        return None
    cls = RelPosHeadAttention if table is not None else RopeHeadAttention if rope \
        else HeadAttention
    out = cls.__new__(cls)
    nn.Module.__init__(out)
    out.head_dim, out.scale, out.qkv, out.proj = head_dim, float(scale), qkv, proj
    out.q_norm = getattr(module, "q_norm", None) or nn.Identity()
    out.k_norm = getattr(module, "k_norm", None) or nn.Identity()
    if table is not None:
        out.relative_position_bias_table = table
        out.register_buffer("relative_position_index", index, persistent=False)
    if isinstance(out, RopeHeadAttention):
        out.num_prefix_tokens = int(cast(int, module.num_prefix_tokens))
        out.rotate_half = bool(getattr(module, "rotate_half", False))
    return out


def _with_separate_bias(module: nn.Module, qkv: nn.Linear) -> nn.Linear | None:
    """``qkv``, or for a layer that keeps its q, k and v biases apart from a bias-free
    ``qkv`` (BEiT's ``q_bias``, ``k_bias``, ``v_bias``; a missing one is zero) a linear layer
    with the same weight and those biases joined; ``None`` for a layout it cannot join."""
    parts = [getattr(module, f"{p}_bias", None) for p in "qkv"]
    if all(b is None for b in parts):
        return qkv
    size = qkv.out_features // 3
    if qkv.bias is not None or any(b is not None and (not isinstance(b, torch.Tensor) or
                                                      b.shape != (size,)) for b in parts):
        return None
    like = qkv.weight
    joined = torch.cat([b.detach() if b is not None else
                        torch.zeros(size, dtype=like.dtype, device=like.device) for b in parts])
    out = nn.Linear(qkv.in_features, qkv.out_features, bias=True, device="meta")
    out.weight = qkv.weight
    out.bias = nn.Parameter(joined.clone(), requires_grad=like.requires_grad)
    return out


def _functional_qkv(module: nn.Module) -> bool:
    """Whether ``module`` computes its q, k and v with its ``qkv`` weight without calling
    ``qkv`` (BEiT joins separate biases with ``F.linear``), so no linear call counts them."""
    return not isinstance(module, HeadAttention) and \
        any(getattr(module, f"{p}_bias", None) is not None for p in "qkv") and \
        not getattr(module, "qkv_bias_separate", False)


def as_head_attention(module: nn.Module) -> HeadAttention | None:
    """``module`` itself if it is a :class:`HeadAttention`; else, for a layer built like one
    whose output on random tokens equals a :class:`HeadAttention`'s over its weights (float64,
    eval mode), that :class:`HeadAttention` (sharing ``module``'s ``qkv``, ``proj`` and norm
    modules); else ``None``. (A layer on the ``meta`` device, built only to check a file's
    structure, has no values to compare: it is taken by its structure.)"""
    if isinstance(module, HeadAttention):
        return module
    cand = _candidate(module)
    if cand is None:
        return None
    if cand.qkv.weight.is_meta:  # a structure built to be checked, no values: as built
        return cand
    ref = copy.deepcopy(module).double().eval()
    mine = _candidate(ref)
    if mine is None:
        return None
    gen = torch.Generator().manual_seed(0)
    tokens = cand.relative_position_index.shape[0] if isinstance(cand, RelPosHeadAttention) \
        else 5  # (a relative-position bias is made for one token count)
    x = torch.randn(2, tokens, cand.qkv.in_features, generator=gen, dtype=torch.float64)
    calls: list[dict] = [{}]
    if isinstance(cand, RopeHeadAttention):  # and with a rotary embedding, a random one
        rows = tokens - cand.num_prefix_tokens
        calls.append({"rope": torch.randn(rows, 2 * cand.head_dim, generator=gen,
                                          dtype=torch.float64)})
    for kwargs in calls:
        try:
            with torch.no_grad():
                want, got = ref(x, **kwargs), mine.eval()(x, **kwargs)
        except Exception:  # a forward that needs more than the tokens (masks, sizes)
            return None
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            return None
        if not bool(torch.allclose(want, got, rtol=MATCH_TOL, atol=MATCH_TOL)):
            return None
    return cand


def head_rows(heads: tuple[int, ...], num_heads: int, head_dim: int) -> torch.Tensor:
    """The ``qkv`` rows of heads ``heads`` (in ``q | k | v`` order)."""
    rows = [part * num_heads * head_dim + h * head_dim + d
            for part in range(3) for h in heads for d in range(head_dim)]
    return torch.tensor(rows, dtype=torch.long)


def keep_heads(module: nn.Module, heads: tuple[int, ...]) -> nn.Module:
    """``module`` keeping only ``heads``: a :class:`SelfAttentionMHA` with its
    ``in_proj`` rows cut, any other as a :class:`HeadAttention` with its ``qkv`` rows cut
    (in place; the output projection's columns are the plan's entry for that layer)."""
    if isinstance(module, SelfAttentionMHA):
        layout = heads_of(module)
        if layout is None:
            raise PlanError("plan removes heads of a MultiheadAttention with separate key "
                            "and value sizes")
        _check_heads(heads, layout.count)
        idx = head_rows(heads, layout.count, layout.dim)
        with torch.no_grad():
            module.in_proj_weight = _rows_of(module.in_proj_weight, idx)
            if module.in_proj_bias is not None:
                module.in_proj_bias = _rows_of(module.in_proj_bias, idx)
        module.num_heads = len(heads)
        return module
    if isinstance(module, WindowHeadAttention):
        _check_heads(heads, module.heads)
        _cut_rows(module.qkv, head_rows(heads, module.heads, module.head_dim))
        if isinstance(module, WindowHeadAttentionV2):
            with torch.no_grad():
                module.logit_scale = _rows_of(module.logit_scale, list(heads))
            _cut_rows(cast(nn.Linear, module.cpb_mlp[-1]), list(heads))
        else:
            _cut_table(module, heads)
        module.__dict__["num_heads"] = len(heads)
        return module
    if isinstance(module, GridHeadAttention):
        _check_heads(heads, module.heads)
        _cut_rows(module.to_qkv, head_rows(heads, module.heads, module.head_dim))
        _cut_table(module, heads)
        module.n_heads = len(heads)
        return module
    attn = as_head_attention(module)
    if attn is None:
        raise PlanError(f"plan removes heads of a {type(module).__name__}, which is not "
                        "standard multi-head attention")
    total = attn.num_heads
    _check_heads(heads, total)
    if len(heads) == total and list(heads) == list(range(total)):
        return attn
    _cut_rows(attn.qkv, head_rows(heads, total, attn.head_dim))
    if isinstance(attn, RelPosHeadAttention):
        _cut_table(attn, heads)
    return attn


def _rows_of(param: torch.Tensor, idx: torch.Tensor | list[int]) -> nn.Parameter:
    """A new parameter of ``param``'s rows ``idx`` (its gradient flag kept)."""
    return nn.Parameter(param[idx].clone(), requires_grad=param.requires_grad)


def _cut_rows(linear: nn.Linear, idx: torch.Tensor | list[int]) -> None:
    """``linear`` keeping only its output rows ``idx`` (weight and bias), in place."""
    with torch.no_grad():
        linear.weight = _rows_of(linear.weight, idx)
        if linear.bias is not None:
            linear.bias = _rows_of(linear.bias, idx)
    linear.out_features = len(idx)


def _cut_table(module: nn.Module, heads: tuple[int, ...]) -> None:
    """``module``'s relative-position bias table keeping only the columns of ``heads``."""
    table = cast(nn.Parameter, module.relative_position_bias_table)
    with torch.no_grad():
        module.relative_position_bias_table = nn.Parameter(
            table[:, list(heads)].clone(), requires_grad=table.requires_grad)


def _check_heads(heads: tuple[int, ...], total: int) -> None:
    if not heads or len(set(heads)) != len(heads) or min(heads) < 0 or max(heads) >= total:
        raise PlanError(f"plan keeps heads {list(heads)} of an attention layer with {total}")


def attention_macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image that no conv or linear *module call* counts: the two
    token-by-token products (``q kᵀ`` and the weighted sum of ``v``) of an attention layer
    built like :class:`HeadAttention` (over each row of its input of ``shape``: the image's
    windows when they are folded into the batch), and for ``nn.MultiheadAttention`` (which
    reads its projections' weights without calling them) its projections too; 0 for other
    modules."""
    if isinstance(module, WindowHeadAttention):  # each token with its window's tokens
        (wh, ww), n = module.window_size, module.window_size[0] * module.window_size[1]
        tokens = -(-shape[1] // wh) * wh * -(-shape[2] // ww) * ww
        return 2 * tokens * n * module.heads * module.head_dim
    if isinstance(module, GridHeadAttention):  # each token with its group's tokens
        return 2 * int(shape[1]) * int(shape[2]) ** 2 * module.heads * module.head_dim
    first = not isinstance(module, nn.MultiheadAttention) or module.batch_first
    tokens = int(shape[1] if first else shape[0]) if len(shape) > 1 else 1
    if isinstance(module, SelfAttentionMHA) and module.in_proj_weight is not None:
        rows = module.in_proj_weight.shape[0]  # (its output projection is a module call)
        return tokens * module.embed_dim * rows + 2 * tokens * tokens * (rows // 3)
    if isinstance(module, nn.MultiheadAttention):
        e = module.embed_dim
        kdim, vdim = module.kdim, module.vdim
        return tokens * e * (e + kdim + vdim) + 2 * tokens * tokens * e + tokens * e * e
    attn = as_head_attention(module) if _candidate(module) is not None or \
        isinstance(module, HeadAttention) else None
    if attn is None:  # (a layer of its own kind: its products are not counted)
        return 0
    return _head_macs(attn, shape, _functional_qkv(module))


def _head_macs(attn: HeadAttention, shape: tuple[int, ...], functional_qkv: bool) -> int:
    """:func:`attention_macs` of a layer that ``attn`` stands for, on input ``shape``:
    for each row (1, or the image's windows when they are folded into the batch, as in
    timm's Swin) the token-by-token products, and the q, k, v projection where the layer
    applies it without a module call (``functional_qkv``)."""
    rows = int(shape[0]) if len(shape) > 2 else 1
    tokens = int(shape[1]) if len(shape) > 1 else 1
    own = tokens * attn.qkv.in_features * attn.qkv.out_features if functional_qkv else 0
    return rows * (2 * tokens * tokens * attn.num_heads * attn.head_dim + own)


def macs_counter(module: nn.Module) -> Callable[[tuple[int, ...]], int] | None:
    """:func:`attention_macs` of ``module`` as a function of its input shape, ``module``
    checked once (:func:`as_head_attention` runs the layer on random tokens: a hook that
    counts every call need not run it each time); ``None`` where it counts nothing."""
    if isinstance(module, (WindowHeadAttention, GridHeadAttention, nn.MultiheadAttention)):
        return lambda shape: attention_macs(module, shape)
    attn = as_head_attention(module) if _candidate(module) is not None or \
        isinstance(module, HeadAttention) else None
    if attn is None:
        return None
    functional = _functional_qkv(module)
    return lambda shape: _head_macs(attn, shape, functional)
