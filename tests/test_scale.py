"""Many classes within a memory bound: the profile is made in chunks of classes and only each
class's masks are kept; the component is the one the whole profile gives."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from modellego.analysis.locate import LocateConfig, profiled_layers
from modellego.data import reading
from modellego.disassembly import (
    DisassemblyConfig,
    classes_per_chunk,
    disassemble_model,
    statistics_bytes,
)
from modellego.errors import ModelLegoError
from modellego.surgery.graph import build_channel_graph

ALL = tuple(range(10))


def _layers(model):
    graph = build_channel_graph(model, (1, 28, 28))
    return {lay.name: lay.module for lay in profiled_layers(graph)}


def test_statistics_bytes_and_chunk_size(trained) -> None:
    layers = _layers(trained)
    expected = sum(m.weight.shape[0] * m.weight.shape[1] * 8 for m in layers.values())
    assert statistics_bytes(layers) == expected
    with reading(max_memory=3 * expected * 4 + 5):
        assert classes_per_chunk(layers) == 4
    with reading(max_memory=1):
        assert classes_per_chunk(layers) == 1  # at least one class at a time


@pytest.mark.parametrize("search", [None, 5.0])
def test_chunked_profile_gives_the_whole_profiles_component(trained, digits, search) -> None:
    x, y = digits
    n = int(len(y) * 0.8)
    # the search's halvings need masks of thresholds between the family's steps, which a
    # profile in chunks does not keep: compared without them (the chunked search skips them)
    cfg = DisassemblyConfig(ALL, samples_per_class=8, locate=LocateConfig(rule="mass"),
                            max_accuracy_drop=search, bisect=0)
    val = {} if search is None else {"val_images": x[n:], "val_labels": y[n:]}
    whole = disassemble_model(trained, x[:n], y[:n], classes=ALL, output_classes=ALL,
                              config=cfg, **val)
    per_class = statistics_bytes(_layers(trained))
    with reading(max_memory=3 * per_class * 3):  # 3 classes per chunk: 4 chunks
        chunked = disassemble_model(trained, x[:n], y[:n], classes=ALL, output_classes=ALL,
                                    config=cfg, **val)
    assert whole.chunk_masks is None and chunked.chunk_masks is not None
    assert chunked.plan.to_dict() == whole.plan.to_dict()
    assert chunked.locate == whole.locate and chunked.search == whole.search
    # with an accuracy budget both searched the task located as one class too (in chunks:
    # from the classes' statistics summed chunk by chunk)
    assert any(t["locate"].get("task_level") for t in chunked.search) == (search is not None)
    assert chunked.profile.layers == {} and chunked.profile.samples == whole.profile.samples
    for name, m in whole.profile.means.items():
        torch.testing.assert_close(chunked.profile.means[name], m, rtol=1e-12, atol=1e-12)
    probe = x[n:n + 16]
    assert torch.equal(chunked.model(probe), whole.model(probe))
    if search is not None:  # with halvings asked for: the whole profile makes them, chunks not
        halving = replace(cfg, bisect=2)
        whole2 = disassemble_model(trained, x[:n], y[:n], classes=ALL, output_classes=ALL,
                                   config=halving, reuse=whole, **val)
        with reading(max_memory=3 * per_class * 3):
            chunked2 = disassemble_model(trained, x[:n], y[:n], classes=ALL,
                                         output_classes=ALL, config=halving, **val)
        assert whole2.validation["bisect"] == 2 and chunked2.validation["bisect"] == 0
        assert chunked2.search == chunked.search and chunked2.locate == chunked.locate


def test_what_cannot_be_chunked_is_refused(trained, digits) -> None:
    x, y = digits
    with reading(max_memory=1):
        with pytest.raises(ModelLegoError, match="`refine` re-reads the profile of all 10"):
            disassemble_model(trained, x, y, classes=ALL, output_classes=ALL,
                              config=DisassemblyConfig(ALL, samples_per_class=4,
                                                       max_accuracy_drop=1.0, refine=True),
                              val_images=x[:50], val_labels=y[:50])
        with pytest.raises(ModelLegoError, match="`method` frat cannot profile in chunks"):
            disassemble_model(trained, x, y, classes=ALL, output_classes=ALL,
                              config=DisassemblyConfig(ALL, samples_per_class=4,
                                                       method="frat"))


def test_a_task_located_as_one_class_in_chunks_equals_the_whole_profiles(trained,
                                                                         digits) -> None:
    x, y = digits
    cfg = DisassemblyConfig(ALL, samples_per_class=8,
                            locate=LocateConfig(rule="mass", beta_conv=0.3, beta_linear=0.3,
                                                task_level=True))
    whole = disassemble_model(trained, x, y, classes=ALL, output_classes=ALL, config=cfg)
    per_class = statistics_bytes(_layers(trained))
    with reading(max_memory=3 * per_class * 3):  # 3 classes per chunk: 4 chunks
        chunked = disassemble_model(trained, x, y, classes=ALL, output_classes=ALL,
                                    config=cfg)
    assert chunked.profile_chunks == 4 and whole.profile_chunks == 1
    assert chunked.plan.to_dict() == whole.plan.to_dict()
    union = disassemble_model(trained, x, y, classes=ALL, output_classes=ALL,
                              config=replace(cfg, locate=replace(cfg.thresholds,
                                                                 task_level=False)),
                              reuse=whole)
    assert union.plan.to_dict() != whole.plan.to_dict()


def test_task_level_needs_a_method_that_locates_with_summed_profiles() -> None:
    with pytest.raises(ModelLegoError, match="`method` frat locates each class on its own"):
        DisassemblyConfig(ALL, method="frat",
                          locate=LocateConfig(alpha_conv=0.2, alpha_linear=0.2,
                                              task_level=True)).validate()


def test_a_profile_whose_one_class_does_not_fit_is_refused_before_any_pass(trained,
                                                                          digits) -> None:
    x, y = digits
    layers = _layers(trained)
    per_class = statistics_bytes(layers)
    cfg = DisassemblyConfig((3,), samples_per_class=4, preset="paper")
    largest = max(layers, key=lambda n: layers[n].weight.shape[0] * layers[n].weight.shape[1])
    for classes in ((3,), ALL):  # the whole profile and the profile in chunks
        with reading(max_memory=3 * per_class - 1):
            with pytest.raises(ModelLegoError) as info:
                disassemble_model(trained, x, y, classes=classes, output_classes=ALL,
                                  config=replace(cfg, classes=classes))
        msg = str(info.value)
        assert msg.startswith("the contribution profile of one class holds ")
        assert f"for each of {len(layers)} layers, the largest {largest!r}" in msg
        assert msg.endswith("raise `max_memory` on a machine with that much memory")
    with reading(max_memory=3 * per_class):  # exactly one class fits: profiled one at a time
        comp = disassemble_model(trained, x, y, classes=ALL, output_classes=ALL,
                                 config=replace(cfg, classes=ALL))
    assert comp.profile_chunks == 10


def test_a_pass_batch_follows_the_largest_activation() -> None:
    from helpers import TwoLayer
    from modellego.data.lazy import ACTIVATION_BYTES, MIN_BATCH, default_batch
    from modellego.disassembly import pass_batch

    assert default_batch((1, 28, 28)) == 500  # the input's bound alone
    assert default_batch((1, 28, 28), sample_bytes=225_792) == ACTIVATION_BYTES // 225_792
    assert default_batch((1, 28, 28), sample_bytes=1 << 30) == MIN_BATCH
    assert default_batch((1, 28, 28), sample_bytes=1) == 500  # (never above the input's)
    assert default_batch((3, 2048, 2048), sample_bytes=1 << 30) == 1
    graph = build_channel_graph(TwoLayer().eval(), (1, 8, 8))
    assert graph.sample_bytes() == 6 * 8 * 8 * 4  # the conv's output, float32
    assert pass_batch(graph, torch.zeros(3, 1, 8, 8)) == 500
    wide = build_channel_graph(torch.nn.Sequential(
        torch.nn.Conv2d(1, 512, 3, padding=1), torch.nn.Flatten(),
        torch.nn.Linear(512 * 64 * 64, 2)).eval(), (1, 64, 64))
    assert wide.sample_bytes() == 512 * 64 * 64 * 4
    assert pass_batch(wide, torch.zeros(3, 1, 64, 64)) == MIN_BATCH
