"""Vision transformers in the channel graph: MLP hidden neurons and attention heads are
units, the class token and position embedding run along the token axis, the
LayerNorm'd residual stream is kept whole (and says so). Each network is checked by both
graph invariants (``helpers.assert_graph_invariants``): keep-all reproduces the logits, a
random plan equals the source with those units zeroed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from helpers import assert_graph_invariants, needs
from modellego.analysis.locate import LocateConfig
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.metrics import count_flops, count_macs, macs_by_layer
from modellego.models import create_model
from modellego.models.attention import HeadAttention, as_head_attention, keep_heads
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import Segment, build_channel_graph
from modellego.surgery.plan import full_plan, plan_from_masks
from modellego.surgery.reconstruct import layers_to_refit


def _ours() -> nn.Module:
    return create_model("vit", in_channels=1, input_size=28, width=0.75)


def _torchvision() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                            hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero
    return vit


def _timm(name: str, **kwargs) -> nn.Module:
    timm = needs("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10, **kwargs)


def test_our_vit_heads_and_mlp_neurons_are_units():
    graph = assert_graph_invariants(_ours(), (1, 28, 28), seeds=3)
    assert sorted(graph.attention) == [f"blocks.{i}.attn" for i in range(6)]
    assert {graph.space_size[s] for s in graph.attention.values()} == {3}
    proj = graph.layer("blocks.0.attn.proj")
    assert [(graph.space_size[s.space], s.repeat) for s in proj.in_layout] == [(3, 16)]
    hidden = graph.find(graph.layer("blocks.0.mlp.0").out_space)
    assert hidden not in graph.frozen_spaces and graph.space_size[hidden] == 96
    stream = graph.find(graph.layer("patch_embed").out_space)
    assert stream in graph.frozen_spaces
    assert graph.frozen_reasons[stream] == ("pos_embed varies along positions and these "
                                            "channels (a position embedding); they are kept "
                                            "whole")
    assert graph.channel_params == {"cls_token": (Segment(stream, 48),)}


def test_torchvision_vit_keeps_multihead_attention_whole():
    needs("torchvision")
    graph = assert_graph_invariants(_torchvision(), (3, 28, 28), seeds=4)
    assert graph.attention == {}
    assert not any("self_attention" in lay.name for lay in graph.layers)
    stream = graph.find(graph.layer("conv_proj").out_space)
    assert graph.frozen_reasons[stream] == "reshape at reshape fixes the number of these channels"
    mlp = graph.find(graph.layer("encoder.layers.encoder_layer_0.mlp.0").out_space)
    assert mlp not in graph.frozen_spaces and graph.space_size[mlp] == 64


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_vit_heads_are_removed_as_units(name):
    model = _timm(name)
    graph = assert_graph_invariants(model, (3, 32, 32), seeds=3)
    assert sorted(graph.attention) == ["blocks.0.attn", "blocks.1.attn"]
    # a plan that keeps heads (2,) of block 0 and all of block 1
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    masks[graph.attention["blocks.0.attn"]] = torch.tensor([False, False, True])
    plan = plan_from_masks(graph, masks, range(10))
    comp = apply_plan(model, plan)
    assert type(comp.blocks[0].attn) is HeadAttention and comp.blocks[0].attn.num_heads == 1
    assert type(comp.blocks[1].attn) is type(model.blocks[1].attn)  # whole: not replaced
    assert plan.kept("blocks.0.attn.proj", "in") == tuple(range(128, 192))
    keep_all = apply_plan(model, full_plan(graph))
    assert type(keep_all.blocks[0].attn) is type(model.blocks[0].attn)


def test_attention_with_a_norm_over_all_heads_is_kept_whole():
    model = _timm("vit_tiny_patch16_224", scale_attn_norm=True)
    assert as_head_attention(model.blocks[0].attn) is None
    graph = assert_graph_invariants(model, (3, 32, 32), seeds=3)
    assert graph.attention == {}
    assert [lay.name for lay in graph.layers if "attn" in lay.name] == []


def test_keep_heads_equals_zeroing_the_other_heads():
    torch.manual_seed(1)
    attn = HeadAttention(12, 4, 3).double().eval()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    ctx = {}

    def record(module: nn.Module, args: tuple) -> None:
        ctx["in"] = args[0]

    handle = attn.proj.register_forward_pre_hook(record)
    attn(x)
    handle.remove()
    zeroed = ctx["in"].clone().view(2, 5, 4, 3)
    zeroed[:, :, [0, 2]] = 0
    want = attn.proj(zeroed.view(2, 5, 12))
    cut = keep_heads(_copy(attn), (1, 3))
    cut.proj.weight = nn.Parameter(cut.proj.weight[:, [3, 4, 5, 9, 10, 11]])
    cut.proj.in_features = 6
    assert cut.num_heads == 2 and cut.qkv.out_features == 18
    assert torch.allclose(cut(x), want, rtol=0, atol=1e-12)
    with pytest.raises(Exception, match=r"plan keeps heads \[4\] of an attention layer with 4"):
        keep_heads(_copy(attn), (4,))


def _copy(m: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(m)

def _heads_cut(model: nn.Module, graph, layer: str, keep: list[bool]) -> nn.Module:
    """``model``'s component that keeps every unit but the heads of attention ``layer``
    that ``keep`` drops (all ten outputs)."""
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    masks[graph.attention[layer]] = torch.tensor(keep)
    return apply_plan(model, plan_from_masks(graph, masks, range(10)))

def _swin_heads_cut(model: nn.Module) -> nn.Module:
    """The graph invariants of the small Swin of the two Swin tests (2 then 4 heads in two
    blocks per stage, each layer's heads a space) and the cut attention of its component
    that keeps heads 1 and 3 of the last layer."""
    graph = assert_graph_invariants(model, (3, 32, 32), seeds=4)
    assert {name: graph.space_size[s] for name, s in graph.attention.items()} == {
        "features.1.0.attn": 2, "features.1.1.attn": 2, "features.3.0.attn": 4,
        "features.3.1.attn": 4}
    comp = _heads_cut(model, graph, "features.3.1.attn", [False, True, False, True])
    cut = comp.features[3][1].attn
    assert cut.num_heads == 2 and cut.qkv.out_features == 48
    return cut




def test_flops_count_the_token_products():
    model = _ours()
    macs = macs_by_layer(model, (1, 28, 28))
    tokens, heads, head_dim = 50, 3, 16
    assert macs["blocks.0.attn"] == 2 * tokens * tokens * heads * head_dim
    assert macs["blocks.0.attn.qkv"] == tokens * 48 * 144
    assert count_macs(model, (1, 28, 28)) == sum(macs.values())
    tv = _torchvision()  # MultiheadAttention: projections read as weights, counted here
    mha = macs_by_layer(tv, (3, 28, 28))["encoder.layers.encoder_layer_0.self_attention"]
    assert mha == 17 * 32 * 96 + 2 * 17 * 17 * 32 + 17 * 32 * 32
    # timm's attention, taken for a HeadAttention by running it on random tokens: the check
    # runs before the counting hooks (run inside one, it met the hook in its copy, failed,
    # and the products went uncounted)
    vit = _timm("vit_tiny_patch16_224").eval()
    attn = vit.blocks[0].attn
    tokens = 1 + (32 // 8) ** 2
    assert macs_by_layer(vit, (3, 32, 32))["blocks.0.attn"] == \
        2 * tokens * tokens * attn.num_heads * attn.head_dim


def test_default_disassembly_of_a_vit_cuts_heads_and_neurons():
    torch.manual_seed(0)
    model = _ours().eval()
    x = torch.randn(60, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    y = torch.arange(60) % 10
    comp = disassemble_model(model, x, y, classes=(2, 7), output_classes=range(10),
                             config=DisassemblyConfig((2, 7), samples_per_class=3,
                                                      batch_size=20))
    fit = comp.reconstruction
    assert fit is not None
    assert sorted([f.name for f in fit.layers] + list(fit.skipped)) == \
        sorted(lay.name for lay in layers_to_refit(comp.graph, comp.plan))
    with torch.no_grad():
        assert comp.model(x[:2]).shape == (2, 2)
    build_channel_graph(comp.model, (1, 28, 28))  # a component is a ViT graph again
    # the search also walks both families (the task located as one class, the union of
    # the classes' masks) with every contributing head kept, measuring only the candidates
    # whose cut costs less than the result of the families before it; when it measured
    # none, even their most aggressive steps cost at least that result
    whole = {f"blocks.{i}.attn.proj": 0.0 for i in range(6)}
    kept = [t for t in comp.search if t["locate"]["layer_beta"] == whole]
    before = [t for t in comp.search if t["locate"]["layer_beta"] == {}]
    best = min((t for t in before if t["ok"]), key=lambda t: t["flops_ratio"])
    assert all(t["flops_ratio"] < best["flops_ratio"] for t in kept)
    if not kept:
        for level in (True, False):
            heads = replace(LocateConfig(rule="mass", beta_conv=0.9, beta_linear=0.9),
                            layer_beta=tuple(whole.items()), task_level=level)
            cut = disassemble_model(model, x, y, classes=(2, 7), output_classes=range(10),
                                    config=DisassemblyConfig((2, 7), locate=heads,
                                                             reconstruct=0,
                                                             samples_per_class=3,
                                                             batch_size=20),
                                    reuse=comp)
            assert count_flops(cut.model, (1, 28, 28)) / count_flops(model, (1, 28, 28)) >= \
                best["flops_ratio"]


#: timm transformer families at tiny sizes: (kwargs, input size, attention layers with
#: removable heads)
TIMM_FAMILIES = {
    # (Swin: heads are units where one window covers the map, attention over one image's
    # tokens; the first stage attends within 4 windows folded into the batch: kept whole)
    "swin_tiny_patch4_window7_224": (dict(img_size=32, window_size=4, embed_dim=16,
                                          depths=(1, 1), num_heads=(1, 2)), 32, 1),
    "cait_xxs24_224": (dict(img_size=32, patch_size=8, depth=1, depth_token_only=1,
                            embed_dim=32, num_heads=2), 32, 0),
    "pit_ti_224": (dict(img_size=64, depth=(1, 1, 1)), 64, 3),
    "beit_base_patch16_224": (dict(img_size=32, patch_size=8, depth=1, embed_dim=32,
                                   num_heads=2), 32, 1),
    "eva02_tiny_patch14_224": (dict(img_size=56, depth=1), 56, 1),
}


def _influential(model: nn.Module) -> nn.Module:
    """Parameters a library starts near zero (a head at zero, layer scales of 1e-5) drawn
    again, so that removing a unit changes the logits and the invariants can tell."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and p.std() < 1e-3:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return model


@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_timm_transformer_families(name):
    """Swin (windows folded into the batch, shifted by roll), CaiT (a class token joining
    late), PiT (pooling between stages), BEiT (heads with their relative-position bias and
    separate q/v biases: units) and EVA (heads with the rotary embedding its blocks give:
    units)."""
    timm = needs("timm")
    kwargs, size, heads = TIMM_FAMILIES[name]
    torch.manual_seed(0)
    model = _influential(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    graph = assert_graph_invariants(model, (3, size, size), seeds=3)
    assert len(graph.attention) == heads
    assert set(graph.frozen_reasons) == graph.frozen_spaces


def test_global_response_norm_keeps_its_channels_whole():
    """ConvNeXt-V2's GRN divides each channel by the mean response over all channels:
    those channels are kept whole, and the reports say why."""
    timm = needs("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)
    graph = build_channel_graph(model, (3, 32, 32))
    hidden = graph.find(graph.layer("stages.0.blocks.0.mlp.fc1").out_space)
    assert graph.frozen_reasons[hidden] == \
        "mean at mean takes a statistic over these channels"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(apply_plan(model, full_plan(graph)).eval()(x), model.eval()(x))


def test_multihead_self_attention_heads_are_units_once_converted():
    """A network built from a file (``build_architecture``) has its
    ``nn.MultiheadAttention`` layers as ``SelfAttentionMHA``: same results, and the heads of
    its self-attention are units."""
    needs("torchvision")
    from modellego.models.attention import SelfAttentionMHA, self_attention_layers

    plain = _torchvision().eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        want = plain(x)
        model = self_attention_layers(_copy(plain))
        assert type(model.encoder.layers[0].self_attention) is SelfAttentionMHA
        assert torch.allclose(model(x), want, rtol=0, atol=1e-5)
    graph = assert_graph_invariants(model, (3, 28, 28), seeds=4)
    assert sorted(graph.attention) == [f"encoder.layers.encoder_layer_{i}.self_attention"
                                       for i in range(2)]
    proj = graph.layer("encoder.layers.encoder_layer_0.self_attention.out_proj")
    assert [(graph.space_size[s.space], s.repeat) for s in proj.in_layout] == [(2, 16)]
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    masks[graph.attention["encoder.layers.encoder_layer_1.self_attention"]] = \
        torch.tensor([True, False])
    comp = apply_plan(model, plan_from_masks(graph, masks, range(10))).eval()
    attn = comp.encoder.layers[1].self_attention
    assert attn.num_heads == 1 and attn.in_proj_weight.shape == (48, 32)
    with pytest.raises(ValueError, match="computes plain self-attention only"):
        attn(torch.zeros(1, 4, 32), torch.zeros(1, 4, 32), torch.zeros(1, 4, 32))
    macs = macs_by_layer(model, (3, 28, 28))
    assert macs["encoder.layers.encoder_layer_0.self_attention"] == \
        17 * 32 * 96 + 2 * 17 * 17 * 32
    assert macs["encoder.layers.encoder_layer_0.self_attention.out_proj"] == 17 * 32 * 32


def test_a_head_is_located_by_the_sum_of_its_features():
    """Locating reads an attention head as one unit: its features' contributions to each
    output are summed, and the head is kept or dropped by that sum (the mass rule here)."""
    from modellego.analysis.locate import LocateConfig, layer_heads, locate_class
    from modellego.analysis.profile import contribution_profile

    model = _ours().eval()
    graph = build_channel_graph(model, (1, 28, 28))
    x = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.arange(20) % 2
    layers = {lay.name: lay.module for lay in graph.layers}
    profile = contribution_profile(model, layers, x, y, classes=[0, 1])
    proj = graph.layer("blocks.5.attn.proj")
    assert layer_heads(graph, proj) == 16 and layer_heads(graph, graph.layer("head")) == 0
    config = LocateConfig(rule="mass", beta_linear=0.5)
    masks = locate_class(graph, profile, 0, 0, config)
    S = profile.for_class(proj.name, 0).reshape(48, 3, 16).sum(-1)  # (outputs, heads)
    share = (S / S.sum(1, keepdim=True)).sum(0)  # every output relevant: the stream is whole
    order = torch.sort(-share, stable=True).indices
    cum = torch.cumsum(share[order], 0)
    want = torch.zeros(3, dtype=torch.bool)
    want[order[:int((cum < 0.5 * cum[-1]).sum()) + 1]] = True
    assert not bool(want.all())  # (features one by one would keep every head)
    assert torch.equal(masks[graph.attention["blocks.5.attn"]], want)


@pytest.mark.parametrize("name, reasons", [
    ("resnest14d", {"grouped conv", "softmax at softmax normalises over these channels"}),
    ("skresnet18", {"node 'mul' combines these channels many to many",
                    "softmax at softmax normalises over these channels"}),
])
def test_split_attention_and_selective_kernels_are_kept_whole(name, reasons):
    """ResNeSt's split attention and SK's selective kernels add up their branches after a
    softmax over them: those channels are kept whole, the rest of the network is not."""
    timm = needs("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    graph = assert_graph_invariants(model, (3, 32, 32), seeds=3)
    assert all(any(r.startswith(want) for r in graph.frozen_reasons.values())
               for want in reasons)
    assert graph.frozen_spaces != set(graph.spaces())


def test_swin_window_attention_heads_are_units_once_converted():
    """torchvision's Swin (V1) window attention, as a network built from a file has it
    (``WindowHeadAttention``): the same results, shifted windows included, and its heads
    (with their columns of the relative-position bias table) are units."""
    needs("torchvision")
    from torchvision.models.swin_transformer import SwinTransformer

    from modellego.models.attention import WindowHeadAttention, self_attention_layers

    torch.manual_seed(0)
    plain = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                            window_size=[2, 2], num_classes=10).eval()
    x = torch.randn(3, 3, 30, 30)  # (not whole windows: padded)
    model = self_attention_layers(_copy(plain))
    attn = model.features[1][1].attn
    assert type(attn) is WindowHeadAttention and attn.shift_size == [1, 1]
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), rtol=0, atol=1e-5)
    cut = _swin_heads_cut(model)
    assert torch.equal(cut.relative_position_bias_table,
                       model.features[3][1].attn.relative_position_bias_table[:, [1, 3]])
    macs = macs_by_layer(model, (3, 32, 32))
    assert macs["features.1.0.attn"] == 2 * 64 * 4 * 2 * 8  # 64 tokens, windows of 4


def test_swin_v2_window_attention_heads_are_units_once_converted():
    """torchvision's Swin V2 window attention (cosine attention with a logit scale per head,
    each head's position bias from one output of a small MLP), as a network built from a
    file has it (``WindowHeadAttentionV2``): the same results, the key bias torchvision
    ignores included, and its heads (with their logit scales and rows of the MLP's last
    layer) are units."""
    needs("torchvision")
    from torchvision.models.swin_transformer import (
        PatchMergingV2,
        SwinTransformer,
        SwinTransformerBlockV2,
    )

    from modellego.models.attention import WindowHeadAttentionV2, self_attention_layers

    torch.manual_seed(0)
    plain = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                            window_size=[2, 2], num_classes=10, block=SwinTransformerBlockV2,
                            downsample_layer=PatchMergingV2).eval()
    with torch.no_grad():
        for block in (plain.features[1][0], plain.features[3][1]):
            block.attn.logit_scale.normal_(2.0, 0.5)  # heads of their own scales
            block.attn.qkv.bias.normal_()  # (its key part is computed with as zero)
    x = torch.randn(3, 3, 30, 30)  # (not whole windows: padded)
    with torch.no_grad():
        want = plain(x)
    model = self_attention_layers(_copy(plain))
    attn = model.features[3][1].attn
    assert type(attn) is WindowHeadAttentionV2 and attn.shift_size == [1, 1]
    third = attn.qkv.out_features // 3  # 32 channels at this stage
    assert third == 32 and not attn.qkv.bias[third:2 * third].any()
    assert attn.qkv.bias[:third].any() and attn.qkv.bias[2 * third:].any()
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=0, atol=1e-5)
    # a state dict with other key biases (as a file may hold) loads to the same results
    model.load_state_dict(plain.state_dict())
    assert not attn.qkv.bias[third:2 * third].any()
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=0, atol=1e-5)
    cut = _swin_heads_cut(model)
    assert torch.equal(cut.logit_scale, attn.logit_scale[[1, 3]])
    assert torch.equal(cut.cpb_mlp[-1].weight, attn.cpb_mlp[-1].weight[[1, 3]])
    assert cut.cpb_mlp[-1].out_features == 2
    macs = macs_by_layer(model, (3, 32, 32))
    assert macs["features.1.0.attn"] == 2 * 64 * 4 * 2 * 8  # 64 tokens, windows of 4


def test_beit_attention_heads_with_their_relative_position_bias_are_units():
    """timm's BEiT attention (a bias-free qkv with separate q and v biases joined by
    ``F.linear``, a relative-position bias per head, the class token included) is taken for
    standard attention with a bias per head: removing a head removes its q, k, v rows and
    biases and its column of the bias table, and FLOPs count the functional q, k, v
    projection of the source as the component's module call."""
    timm = needs("timm")
    from modellego.models.attention import RelPosHeadAttention, heads_of

    torch.manual_seed(0)
    model = _influential(timm.create_model("beit_base_patch16_224", pretrained=False,
                                           num_classes=10, img_size=32, patch_size=8,
                                           depth=2, embed_dim=32, num_heads=4)).eval()
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    cand = as_head_attention(attn)
    assert type(cand) is RelPosHeadAttention and cand.relative_position_index.shape == (17, 17)
    assert heads_of(attn).count == 4 and cand.qkv.weight is attn.qkv.weight
    assert torch.equal(cand.qkv.bias, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]))
    graph = assert_graph_invariants(model, (3, 32, 32), seeds=4)
    assert sorted(graph.attention) == ["blocks.0.attn", "blocks.1.attn"]
    comp = _heads_cut(model, graph, "blocks.1.attn", [True, False, False, True]).eval()
    cut = comp.blocks[1].attn
    assert type(cut) is RelPosHeadAttention and cut.num_heads == 2
    assert torch.equal(cut.relative_position_bias_table,
                       attn.relative_position_bias_table[:, [0, 3]])
    assert torch.equal(cut.qkv.bias, cand.qkv.bias[heads_rows([0, 3])])
    # the index is made by the layer, as BEiT's own (not a weight of the file)
    assert "blocks.1.attn.relative_position_index" not in comp.state_dict()
    assert "blocks.1.attn.relative_position_bias_table" in comp.state_dict()
    # the source's q, k, v projection (F.linear, no module call) is counted as the cut's is
    tokens, dim = 17, 32
    macs = macs_by_layer(model, (3, 32, 32))
    assert macs["blocks.1.attn"] == 2 * tokens * tokens * 32 + tokens * dim * 3 * dim
    cut_macs = macs_by_layer(comp, (3, 32, 32))
    assert cut_macs["blocks.1.attn.qkv"] == tokens * dim * 3 * 16
    assert cut_macs["blocks.1.attn"] == 2 * tokens * tokens * 16


def heads_rows(heads: list[int]) -> torch.Tensor:
    """The qkv rows of ``heads`` of 4 heads of 8 features (q | k | v)."""
    from modellego.models.attention import head_rows
    return head_rows(tuple(heads), 4, 8)


def test_maxvit_attention_heads_are_units_once_converted():
    """torchvision's MaxViT attention (``RelativePositionalMultiHeadAttention`` over
    ``(B, G, P, D)`` groups of one image: windows, then grid cells), as a network built from
    a file has it (``GridHeadAttention``): the same results, and its heads (with their
    columns of the relative-position bias table) are units."""
    needs("torchvision")
    from torchvision.models.maxvit import MaxVit

    from modellego.models.attention import GridHeadAttention, self_attention_layers

    torch.manual_seed(0)
    plain = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2,
                   block_channels=[16, 32], block_layers=[1, 1], head_dim=8,
                   stochastic_depth_prob=0.0, num_classes=10).eval()
    with torch.no_grad():
        for m in plain.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_()  # heads of their own biases
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = plain(x)
    model = self_attention_layers(_copy(plain))
    names = [n for n, m in model.named_modules() if isinstance(m, GridHeadAttention)]
    assert len(names) == 4  # a window and a grid attention per block
    with torch.no_grad():
        assert torch.allclose(model(x), want, rtol=0, atol=1e-5)
    graph = assert_graph_invariants(model, (3, 32, 32), seeds=4)
    assert sorted(graph.attention) == sorted(names)
    assert sorted(graph.space_size[s] for s in graph.attention.values()) == [2, 2, 4, 4]
    last = names[-1]
    comp = _heads_cut(model, graph, last, [False, True, True, False])
    cut, whole = comp.get_submodule(last), model.get_submodule(last)
    assert cut.heads == cut.n_heads == 2 and cut.to_qkv.out_features == 48
    assert torch.equal(cut.relative_position_bias_table,
                       whole.relative_position_bias_table[:, [1, 2]])
    assert cut.scale_factor == whole.scale_factor == 32 ** -0.5
    macs = macs_by_layer(model, (3, 32, 32))
    # stage 2 at 4x4 positions in partitions of 2x2: 4 groups of 4 tokens, 4 heads of 8
    assert macs[last] == 2 * 4 * 4 * 4 * 4 * 8


def test_eva_attention_heads_with_a_rotary_embedding_are_units():
    """timm's EVA attention takes from its block a rotary position embedding made without
    the image (the same rotation for every head): it is taken for standard attention with
    that rotation (RopeHeadAttention, checked with and without a random embedding), and its
    heads are units; an embedding computed from the image would keep them whole."""
    timm = needs("timm")
    from modellego.models.attention import RopeHeadAttention

    torch.manual_seed(0)
    model = _influential(timm.create_model("eva02_tiny_patch14_224", pretrained=False,
                                           num_classes=10, img_size=56, depth=2)).eval()
    attn = model.blocks[1].attn
    cand = as_head_attention(attn)
    assert type(cand) is RopeHeadAttention and cand.num_prefix_tokens == 1
    tokens = torch.randn(2, 17, 192)
    rope = model.rope.get_embed()
    with torch.no_grad():
        assert torch.allclose(cand(tokens, rope=rope), attn(tokens, rope=rope), atol=1e-5)
        assert not torch.allclose(cand(tokens, rope=rope), cand(tokens), atol=1e-3)
    graph = assert_graph_invariants(model, (3, 56, 56), seeds=3)
    assert sorted(graph.attention) == ["blocks.0.attn", "blocks.1.attn"]
    comp = _heads_cut(model, graph, "blocks.1.attn", [True, False, True]).eval()
    cut = comp.blocks[1].attn
    assert type(cut) is RopeHeadAttention and cut.num_heads == 2
    assert cut.qkv.out_features == 3 * 2 * 64


class _ImageRope(nn.Module):
    """EVA attention given a "rotary embedding" read from the image itself."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.eva import EvaAttention

        self.embed = nn.Linear(4, 16)
        self.attn = EvaAttention(16, num_heads=2, num_prefix_tokens=1, scale_norm=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, 9, 16)
        rope = tokens[:, None, 1:, :].tanh()  # (B, 1, 8, 2 x 8): each image's own
        return self.fc(self.attn(tokens, rope=rope).mean(1))


def test_a_rotary_embedding_made_from_the_image_keeps_the_heads_whole():
    needs("timm")
    torch.manual_seed(0)
    model = _ImageRope().eval()
    assert type(as_head_attention(model.attn)).__name__ == "RopeHeadAttention"
    graph = build_channel_graph(model, (4, 3, 3))
    assert graph.attention == {}
    assert any(r.startswith("attention attn (EvaAttention) is kept whole")
               for r in graph.frozen_reasons.values())


def test_attention_over_windows_folded_into_the_batch_counts_every_window():
    """timm's Swin attends within windows folded into the batch: one image's attention
    products are those of every window (4 windows of 4 x 4 tokens in the first stage, one
    head of 16), and the layer's heads stay whole there."""
    timm = needs("timm")
    kwargs, size, _ = TIMM_FAMILIES["swin_tiny_patch4_window7_224"]
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False,
                              num_classes=10, **kwargs).eval()
    macs = macs_by_layer(model, (3, size, size))
    assert macs["layers.0.blocks.0.attn"] == 4 * 2 * 16 * 16 * 1 * 16
    graph = build_channel_graph(model, (3, size, size))
    assert "layers.0.blocks.0.attn" not in graph.attention
    assert "layers.1.blocks.0.attn" in graph.attention  # one window: over the image's tokens
