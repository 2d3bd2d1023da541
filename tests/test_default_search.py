"""The default disassembly: presets, the paired confidence bound, the validation top-up, and
the search that chooses the smallest reconstructed component within the budget."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from scipy.stats import norm

from helpers import run_cli
from modellego.analysis.locate import LocateConfig
from modellego.analysis.methods import get_method
from modellego.analysis.profile import SampleSelection
from modellego.analysis.search import (
    MASS_STEPS,
    PairedDrop,
    cheaper_candidates,
    cost_family,
    first_passing,
    midpoint,
    rule_family,
    search,
)
from modellego.data import load_split, normalize
from modellego.disassembly import (
    BISECT_MIN_IMAGES_IN_BUDGET,
    DEFAULT_BISECT,
    DEFAULT_BUDGET,
    DEFAULT_CONFIDENCE,
    DEFAULT_FIT_IMAGES,
    DEFAULT_VALIDATION,
    HALVING_MIN_GAIN,
    DisassemblyConfig,
    TaskCandidates,
    bisect_steps,
    disassemble_model,
    validation_topup,
)
from modellego.errors import ModelLegoError
from modellego.io import read_manifest
from modellego.metrics import correct_flags, predict_logits

TASK = (0, 1, 2)


# --------------------------------------------------------------------------- presets


def test_the_default_preset_is_the_searched_reconstructed_mass_rule() -> None:
    cfg = DisassemblyConfig(TASK)
    assert cfg.preset == "default" and cfg.locate == LocateConfig(rule="mass")
    assert cfg.max_accuracy_drop == DEFAULT_BUDGET == 0.5
    assert cfg.confidence == DEFAULT_CONFIDENCE == 0.9 and cfg.confident
    assert cfg.reconstruct == DEFAULT_FIT_IMAGES == 1000
    assert cfg.validation_per_class == DEFAULT_VALIDATION == 500
    assert cfg.bisect == DEFAULT_BISECT == 2 and cfg.to_dict()["bisect"] == 2
    cfg.validate()
    # given thresholds: no search, the repair stays; another target replaces the budget
    fixed = DisassemblyConfig(TASK, locate=LocateConfig(rule="mass", beta_conv=0.3))
    assert fixed.max_accuracy_drop is None and fixed.reconstruct == 1000 and not fixed.confident
    flops = DisassemblyConfig(TASK, target_flops=0.5)
    assert flops.max_accuracy_drop is None and flops.locate == LocateConfig(rule="mass")
    assert DisassemblyConfig(TASK, max_accuracy_drop=1.0).max_accuracy_drop == 1.0
    # compensation and reconstruction exclude each other: compensate turns the default off
    assert DisassemblyConfig(TASK, compensate=True).reconstruct == 0
    # explicit values win over the preset
    assert DisassemblyConfig(TASK, reconstruct=0, confidence=0.0).confident is False


def test_the_paper_preset_is_the_published_method_exactly() -> None:
    paper = DisassemblyConfig.paper(TASK)
    assert paper == DisassemblyConfig(TASK, preset="paper")
    assert paper.locate == LocateConfig() == get_method("contribution").default_locate()
    assert (paper.max_accuracy_drop, paper.reconstruct, paper.confidence,
            paper.validation_per_class, paper.bisect) == (None, 0, 0.0, 0, 0)
    # the other methods keep their own published defaults under either preset
    frat = DisassemblyConfig(TASK, method="frat")
    assert frat.locate == get_method("frat").default_locate()
    assert (frat.max_accuracy_drop, frat.reconstruct, frat.confidence) == (None, 0, 0.0)
    # and the records say which preset made them
    assert paper.to_dict()["preset"] == "paper"
    assert DisassemblyConfig(TASK).to_dict()["confidence"] == 0.9


@pytest.mark.parametrize("fields, match", [
    ({"preset": "fast"}, "`preset` 'fast' is unknown; use one of default, paper"),
    ({"confidence": 1.0}, "`confidence` must be 0"),
    ({"confidence": 0.3}, "`confidence` must be 0"),
    ({"validation_per_class": -1}, "`validation_per_class` must be >= 0"),
    ({"bisect": -1}, r"`bisect` is a number of halvings and must lie in \[0, 10\], got -1"),
    ({"bisect": 11}, r"`bisect` is a number of halvings and must lie in \[0, 10\], got 11"),
    ({"reconstruct": 5, "compensate": True}, "give one of `compensate` and `reconstruct`"),
])
def test_bad_values_are_refused(fields, match) -> None:
    with pytest.raises(ModelLegoError, match=match):
        DisassemblyConfig(TASK, **fields).validate()


# --------------------------------------------------------------------------- the bound


def test_paired_drop_and_its_bound_equal_an_independent_computation() -> None:
    src = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    comp = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    paired = PairedDrop.of(src, comp)
    assert (paired.n, paired.lost, paired.gained) == (10, 2, 1)
    assert paired.drop == pytest.approx(0.1)
    d = src.double().numpy() - comp.double().numpy()  # +1 lost, -1 gained
    want = d.mean() + norm.ppf(0.9) * d.std(ddof=0) / math.sqrt(len(d))
    assert paired.upper(0.9) == pytest.approx(want, abs=1e-12)
    assert paired.upper(0.5) == pytest.approx(0.1)
    # a candidate that changes no prediction: bound 0 whatever the number of images
    same = PairedDrop.of(src, src.clone())
    assert same.upper(0.99) == 0.0 and same.drop == 0.0
    # gains can pay for losses
    assert PairedDrop.of(torch.tensor([True, False]), torch.tensor([False, True])).drop == 0
    with pytest.raises(ValueError, match="two vectors of one length"):
        PairedDrop.of(src, comp[:3])
    assert PairedDrop(0, 0, 0).upper(0.9) == math.inf


def test_search_with_a_judge_takes_the_most_aggressive_passing_candidate() -> None:
    family = rule_family(LocateConfig(rule="mass"))
    # candidates with beta <= 0.2 pass: the first passing one along the family is 0.2
    cfg, trials = search(family, lambda c: 1 - c.beta_conv, None,
                         judge=lambda c: (0.9, c.beta_conv <= 0.2, f"b{c.beta_conv}"))
    assert cfg.beta_conv == 0.2
    assert all(t.ok == (t.config.beta_conv <= 0.2) for t in trials)
    assert {t.note for t in trials} == {f"b{t.config.beta_conv}" for t in trials}
    with pytest.raises(ValueError, match="exactly one target"):
        search(family, lambda c: 1.0, None)


def test_bisection_halves_the_gap_to_the_failing_neighbour() -> None:
    family = rule_family(LocateConfig(rule="mass"))  # ... 0.5, 0.45, 0.4, 0.35, 0.3 ...
    seen: list[float] = []

    def judge(c: LocateConfig) -> tuple[float, bool, str]:
        seen.append(c.beta_conv)
        return 0.9, c.beta_conv <= 0.3625, ""

    cfg, trials = search(family, lambda c: 1 - c.beta_conv, None, judge=judge, bisect=3)
    # the family gives 0.35 (0.4 fails); then 0.375 fails, 0.3625 passes, 0.36875 fails
    assert cfg == LocateConfig(rule="mass", beta_conv=0.3625, beta_linear=0.3625)
    assert seen[-3:] == [0.375, 0.3625, 0.36875] and len(seen) == len(set(seen))
    assert [t.ok for t in trials[-3:]] == [False, True, False]
    # no bisection: the family's step; the most aggressive step passing: nothing to halve
    assert search(family, lambda c: 0.5, None, judge=judge)[0].beta_conv == 0.35
    top, top_trials = search(family, lambda c: 0.5, None, judge=lambda c: (1.0, True, ""),
                             bisect=3)
    assert top == family[0] and all(t.config in family for t in top_trials)
    # none passes: the least aggressive, no midpoint
    low, _ = search(family, lambda c: 0.5, None, judge=lambda c: (0.0, False, ""), bisect=3)
    assert low == family[-1]


def test_a_halving_is_judged_only_while_the_gap_is_worth_it() -> None:
    family = rule_family(LocateConfig(rule="mass"))  # 0.4 fails, 0.35 passes: gap 0.05
    seen: list[float] = []

    def judge(c: LocateConfig) -> tuple[float, bool, str]:
        seen.append(c.beta_conv)
        return 0.9, c.beta_conv <= 0.3625, ""

    def cost(c: LocateConfig) -> float:
        return 1 - c.beta_conv

    for gain, halvings in ((0.06, []), (0.049, [0.375]), (0.02, [0.375, 0.3625]),
                           (0.0, [0.375, 0.3625, 0.36875])):
        seen.clear()
        cfg, _ = search(family, cost, None, judge=judge, bisect=3, min_gain=gain)
        assert [b for b in seen if b not in MASS_STEPS] == halvings, gain
    assert cfg.beta_conv == 0.3625 and HALVING_MIN_GAIN == 0.01
    # a passing step cheaper than its failing neighbour: what a halving wins is unknown
    seen.clear()
    search(family, lambda c: c.beta_conv, None, judge=judge, bisect=3, min_gain=0.5)
    assert [b for b in seen if b not in MASS_STEPS] == [0.375, 0.3625, 0.36875]


def test_top_first_settles_a_failing_family_in_one_probe() -> None:
    family = rule_family(LocateConfig(rule="mass"))
    seen: list[float] = []

    def judge(limit: float):
        def judged(c: LocateConfig) -> tuple[float, bool, str]:
            seen.append(c.beta_conv)
            return 0.9, c.beta_conv <= limit, ""
        return judged

    # the least aggressive fails: one probe, and that failing candidate is returned
    cfg, trials = search(family, lambda c: 1 - c.beta_conv, None, judge=judge(-1.0),
                         top_first=True)
    assert seen == [family[-1].beta_conv] and cfg == family[-1] and not trials[0].ok
    # it passes: the same bisection below it finds the same candidate as without
    for limit in (0.9, 0.35, 0.001, 0.0):
        seen.clear()
        got, _ = search(family, lambda c: 1 - c.beta_conv, None, judge=judge(limit),
                        top_first=True, bisect=2)
        first = seen[0]
        plain, _ = search(family, lambda c: 1 - c.beta_conv, None, judge=judge(limit),
                          bisect=2)
        assert first == family[-1].beta_conv and got == plain
    assert first_passing(0, lambda i: True, top_first=True) == 0
    assert first_passing(1, lambda i: True, top_first=True) == 0
    assert first_passing(5, lambda i: i >= 3, top_first=True) == 3


def test_the_search_cuts_and_repairs_each_candidate_once(trained, digits, monkeypatch
                                                         ) -> None:
    """Costs are kept per candidate and the best passing one is pinned: comparing the two
    families' results and returning the chosen one repair nothing again."""
    x, y = digits
    cfg = DisassemblyConfig(TASK, samples_per_class=20, reconstruct=150,
                            validation_per_class=60, max_accuracy_drop=3.0)
    made: list[bool] = []
    real = TaskCandidates.make

    def counting(self, plan, repair):
        made.append(repair)
        return real(self, plan, repair)

    monkeypatch.setattr(TaskCandidates, "make", counting)
    comp = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                             config=cfg)
    priced = [t for t in comp.search if t["flops_ratio"] is not None]
    assert len(made) == len(priced) and all(made)
    check_families(comp)


def test_a_pinned_candidate_counts_among_the_networks_held() -> None:
    from modellego.analysis.candidates import Candidates

    class Counted(Candidates[int]):
        made: list[int] = []

        def plan(self, key: int):
            return key

        def make(self, plan, repair):
            self.made.append(plan)
            return torch.nn.Identity(), None

    cands = Counted(torch.nn.Identity(), (1,), price_repaired=True, keep=2)
    for key in (1, 2, 3):
        cands.build(key)
    assert list(cands.built) == [(2, True), (3, True)]  # the latest two
    cands.pin(3)
    for key in (4, 5):
        cands.build(key)
    # two networks held: the pinned one and the latest built
    assert list(cands.pinned) == [(3, True)] and list(cands.built) == [(5, True)]
    cands.build(3)
    assert cands.made == [1, 2, 3, 4, 5]  # the pinned one is not made again
    cands.pin(5)
    assert list(cands.pinned) == [(5, True)] and not cands.built


def test_the_cheaper_candidates_are_found_by_bisection_on_cut_costs() -> None:
    family = rule_family(LocateConfig(rule="mass"))  # most aggressive first
    costs = {c: (math.inf if c.beta_conv >= 0.8 else 1 - c.beta_conv) for c in family}
    asked: list[LocateConfig] = []

    def cost(c: LocateConfig) -> float:
        asked.append(c)
        return costs[c]

    for limit in (0.05, 0.5, 0.7, 2.0, math.inf):
        asked.clear()
        got = cheaper_candidates(family, cost, limit)
        assert got == [c for c in family if costs[c] < limit]
        assert len(asked) <= 2 * math.ceil(math.log2(len(family) + 1))
    assert cheaper_candidates([], cost, 1.0) == []


def test_bisection_needs_a_budget_worth_four_validation_images() -> None:
    cfg = DisassemblyConfig(TASK)  # 0.5 pp: 800 images are worth 4
    assert BISECT_MIN_IMAGES_IN_BUDGET == 4
    assert bisect_steps(cfg, True, 800) == 2 and bisect_steps(cfg, True, 799) == 0
    assert bisect_steps(cfg, False, 5000) == 0  # a profile in chunks: masks of steps only
    assert bisect_steps(cfg, True, None) == 0 and bisect_steps(cfg, True, 0) == 0
    assert bisect_steps(replace(cfg, bisect=5), True, 800) == 5
    assert bisect_steps(replace(cfg, max_accuracy_drop=2.0), True, 200) == 2
    assert bisect_steps(DisassemblyConfig(TASK, target_flops=0.5), True, 10**6) == 0
    assert bisect_steps(DisassemblyConfig.paper(TASK, max_accuracy_drop=1.0), True, 10**6) == 0


def test_midpoint_of_thresholds() -> None:
    a = LocateConfig(alpha_conv=0.6, beta_conv=0.4, alpha_linear=0.8, beta_linear=0.6)
    b = LocateConfig(alpha_conv=0.3, beta_conv=0.2, alpha_linear=0.4, beta_linear=0.3)
    assert midpoint(a, b) == LocateConfig(alpha_conv=0.45, beta_conv=0.3, alpha_linear=0.6,
                                          beta_linear=0.45)
    # neighbours of different families, or too close to split: none
    assert midpoint(a, LocateConfig(rule="mass")) is None
    assert midpoint(b, b) is None
    assert midpoint(LocateConfig(beta_conv=0.2), LocateConfig(beta_conv=0.200001)) is None
    assert midpoint(LocateConfig(layer_beta=(("f", 0.5),)), b) is None


# --------------------------------------------------------------------------- the top-up


def test_validation_topup_fills_each_class_from_unselected_training_images() -> None:
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 5)
    selection = SampleSelection((0, 1), 2, {0: (0, 1), 1: (6,)}, {})
    val_labels = torch.tensor([0, 0, 0, 1])
    picked = validation_topup(labels, (0, 1), selection, val_labels, 5)
    # class 0: 5 - 3 = 2 more, from the unselected 2..5 (at most half of them: 2);
    # class 1: 4 wanted, but at most half of the unselected 7..9: 1
    got0 = sorted(i for i in picked.tolist() if labels[i] == 0)
    got1 = sorted(i for i in picked.tolist() if labels[i] == 1)
    assert len(got0) == 2 and set(got0) <= {2, 3, 4, 5}
    assert len(got1) == 1 and set(got1) <= {7, 8, 9} and len(picked) == 3
    assert torch.equal(picked, validation_topup(labels, (0, 1), selection, val_labels, 5))
    assert len(validation_topup(labels, (0, 1), selection, val_labels, 3)) == 1  # class 1 only
    assert len(validation_topup(labels, (0, 1), selection, None, 0)) == 0


# --------------------------------------------------------------------------- on a model


def test_the_default_search_on_a_trained_model(trained, digits) -> None:
    x, y = digits
    val = load_split("digits", "val").subset(TASK)
    vx, vy = normalize(val.images, val.info), val.labels
    cfg = DisassemblyConfig(TASK, samples_per_class=20, reconstruct=150,
                            validation_per_class=60)
    comp = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                             config=cfg, val_images=vx, val_labels=vy)
    v = comp.validation
    assert v is not None and comp.reconstruction is not None
    assert comp.reconstruction.images == 150
    # the split's images first, then 60 per class in all from unselected training images
    assert v["from_validation_split"] == len(vy)
    assert v["from_training_split"] == sum(60 - int((vy == c).sum()) for c in TASK)
    assert v["images"] == 180 and v["resolution_pp"] == pytest.approx(100 / 180)
    topup = validation_topup(y, TASK, comp.selection, vy, 60)
    # the chosen component's bound, computed here from its predictions
    src = torch.cat([correct_flags(predict_logits(trained, xs), ys, range(10), TASK)
                     for xs, ys in ((vx, vy), (x[topup], y[topup]))])
    got = torch.cat([correct_flags(predict_logits(comp.model, xs), ys, TASK)
                     for xs, ys in ((vx, vy), (x[topup], y[topup]))])
    bound = 100 * PairedDrop.of(src, got).upper(0.9)
    assert v["chosen_passes"] == (bound <= 0.5 + 1e-9)
    assert f"bound {bound:.2f} pp at 90%" in v["chosen"]
    assert v["chosen_accuracy"] == pytest.approx(float(got.double().mean()))
    # the search's verdicts: two families (the task located as one class, then the OR of
    # the classes' masks); in each, every candidate measured more aggressive than the
    # family's result failed (the family's steps and the bisection's midpoints), and the
    # chosen one is the cheaper of the two results
    results = check_families(comp)
    assert any(t["locate"].get("task_level") for t in comp.search)
    assert comp.locate.to_dict() in [t["locate"] for t in results.values()]
    assert v["chosen_passes"] == any(t["ok"] for t in comp.search)
    # 180 images: the 0.5 pp budget is worth 0.9 of them, too few to halve steps on
    assert v["bisect"] == 0 and all(t["locate"]["beta_conv"] in MASS_STEPS
                                    for t in comp.search)
    # a 3 pp budget is worth 5.4 images: the gap to the failing neighbour is halved twice
    wide = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                             config=replace(cfg, max_accuracy_drop=3.0), val_images=vx,
                             val_labels=vy, reuse=comp)
    assert wide.validation is not None and wide.validation["bisect"] == DEFAULT_BISECT
    for level in (False, True):
        steps = [t["locate"]["beta_conv"] for t in wide.search
                 if t["locate"].get("task_level", False) == level]
        assert len(steps) == len(set(steps))  # no candidate measured twice
        assert sum(b not in MASS_STEPS for b in steps) <= DEFAULT_BISECT
    assert sum(t["locate"]["beta_conv"] not in MASS_STEPS for t in wide.search
               if t["locate"].get("task_level")) == DEFAULT_BISECT
    check_families(wide)
    if v["chosen_passes"]:
        assert any(t["ok"] and t["locate"] == comp.locate.to_dict() for t in comp.search)
    # thresholds that ask for the task level themselves: the only family searched
    asked = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                              config=replace(cfg, locate=LocateConfig(rule="mass",
                                                                      task_level=True),
                                             max_accuracy_drop=0.5),
                              val_images=vx, val_labels=vy, reuse=comp)
    assert asked.search and all(t["locate"]["task_level"] for t in asked.search)
    # no validation images at all: the training split tops it up alone
    alone = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                              config=cfg, reuse=comp)
    assert alone.validation is not None and alone.validation["from_validation_split"] == 0
    assert alone.validation["images"] == sum(min(60, (int((y == c).sum()) - 20) // 2)
                                             for c in TASK)


def check_families(comp) -> dict[bool, dict]:
    """The two families of ``comp``'s search, checked: per family (``task_level``), the
    most aggressive candidate that passed, with every more aggressive one failed; the
    task-level family is searched first, the union family measured only candidates
    cheaper than its result, the least aggressive of them first (and nothing more when it
    fails), and the chosen component is the cheaper result. Returns the results by
    family."""
    results = {}
    for level in (False, True):
        trials = [t for t in comp.search if t["locate"].get("task_level", False) == level]
        passed = [t for t in trials if t["ok"]]
        if passed:
            best = max(passed, key=lambda t: t["locate"]["beta_conv"])
            assert not any(t["locate"]["beta_conv"] > best["locate"]["beta_conv"]
                           for t in trials if t["ok"])
            results[level] = best
    first = results.get(True)
    levels = [t["locate"].get("task_level", False) for t in comp.search]
    assert levels == sorted(levels, reverse=True)  # the task level first
    unions = [t for t in comp.search if not t["locate"].get("task_level")]
    if first is not None:
        assert all(t["flops_ratio"] < first["flops_ratio"] for t in unions)
        if unions:  # the least aggressive first; a failure there ends the family
            assert unions[0]["locate"]["beta_conv"] == min(
                t["locate"]["beta_conv"] for t in unions)
            assert unions[0]["ok"] or len(unions) == 1
    if results:
        cheapest = min(results.values(), key=lambda t: t["flops_ratio"])
        assert comp.locate.to_dict() == cheapest["locate"]
    return results


def test_reconstruction_never_fits_on_the_validation_images(trained, digits,
                                                            monkeypatch) -> None:
    x, y = digits
    seen: list[torch.Tensor] = []
    import modellego.disassembly as mod

    real = mod.reconstruct_layers

    def spy(net, source, graph, plan, images, **kw):
        seen.append(images.clone())
        return real(net, source, graph, plan, images, **kw)

    monkeypatch.setattr(mod, "reconstruct_layers", spy)
    task = (3, 4)
    cfg = DisassemblyConfig(task, samples_per_class=20, reconstruct=10_000,
                            validation_per_class=70)
    comp = disassemble_model(trained, x, y, classes=task, output_classes=range(10), config=cfg)
    topup = validation_topup(y, task, comp.selection, None, 70)
    # 70 wanted per class, at most half of the unselected training images of each
    unselected = [int((y == c).sum()) - 20 for c in task]
    assert len(topup) == sum(min(70, n // 2) for n in unselected) and seen
    fit = seen[0].flatten(1)
    # every task image not in the top-up, and none of the top-up's
    assert len(fit) == int(torch.isin(y, torch.tensor(task)).sum()) - len(topup)
    held = x[topup].flatten(1)
    assert not bool((torch.cdist(fit, held) == 0).any())


def test_without_validation_images_the_paper_search_still_needs_them(trained, digits) -> None:
    x, y = digits
    with pytest.raises(ModelLegoError, match="needs `val_images`"):
        disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                          config=DisassemblyConfig.paper(TASK, max_accuracy_drop=1.0))


# --------------------------------------------------------------------------- command line


def test_cli_default_and_paper_preset(simnet_digits_file, tmp_path) -> None:
    out, rep = tmp_path / "d.safetensors", tmp_path / "d.json"
    code, stdout, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                                 "--samples-per-class", "10", "--reconstruct", "100",
                                 "--out", out, "--report", rep])
    assert code == 0, err
    assert "search: the smallest candidate whose drop is within 0.5 pp at 90% confidence" \
        in stdout and "one image = " in stdout
    prov = read_manifest(out)["provenance"]
    assert prov["config"]["preset"] == "default" and prov["locate"]["rule"] == "mass"
    assert prov["validation"]["confidence"] == 0.9 and prov["reconstruction"]["images"] == 100
    assert prov["config"]["bisect"] == 2
    # the budget is worth fewer than 4 of these validation images: no halving, and it says so
    assert prov["validation"]["images"] * 0.5 / 100 < 4 and prov["validation"]["bisect"] == 0
    assert "steps: the family's only (no halving: the budget is worth fewer than 4" in stdout
    assert all(t["locate"]["beta_conv"] in MASS_STEPS for t in prov["threshold_search"])
    wide = tmp_path / "w.safetensors"
    code, stdout, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                                 "--samples-per-class", "10", "--reconstruct", "100",
                                 "--max-accuracy-drop", "20", "--bisect", "1", "--out", wide])
    assert code == 0, err
    prov = read_manifest(wide)["provenance"]
    assert prov["config"]["bisect"] == 1 and prov["validation"]["bisect"] == 1
    assert "steps: the family's, then up to 1 halving of the gap to the failing neighbour" in stdout
    paper = tmp_path / "p.safetensors"
    code, stdout, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                                 "--samples-per-class", "10", "--preset", "paper",
                                 "--out", paper])
    assert code == 0, err
    prov = read_manifest(paper)["provenance"]
    assert prov["locate"] == LocateConfig().to_dict() and "validation" not in prov
    assert "reconstruction" not in prov and "search:" not in stdout
    plain = tmp_path / "n.safetensors"
    code, _, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                            "--samples-per-class", "10", "--no-reconstruct",
                            "--beta-conv", "0.1", "--beta-linear", "0.1", "--out", plain])
    assert code == 0, err
    prov = read_manifest(plain)["provenance"]
    assert "reconstruction" not in prov and "validation" not in prov
    assert prov["locate"]["rule"] == "mass" and prov["locate"]["beta_conv"] == 0.1
    bad = tmp_path / "bad.safetensors"
    code, _, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                            "--reconstruct", "10", "--no-reconstruct", "--out", bad])
    assert code == 2 and "give one of --reconstruct and --no-reconstruct" in err
    code, _, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                            "--confidence", "1.5", "--out", bad])
    assert code == 2 and "--confidence must be 0" in err and not bad.exists()
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["disassemble", simnet_digits_file, "--classes", "0,1",
                            "--bisect", "-1", "--out", bad])
    assert code == 2 and "--bisect is a number of halvings" in err and not bad.exists()


def test_a_cost_target_walks_the_finer_mass_family() -> None:
    family = cost_family(rule_family(LocateConfig(rule="mass")))
    betas = [c.beta_conv for c in family]
    assert betas == sorted(set(betas), reverse=True)  # most aggressive first, no repeats
    assert set(MASS_STEPS) <= set(betas) and {0.575, 0.525, 0.95} <= set(betas)
    assert all(c.beta_conv == c.beta_linear for c in family)
    # the count rule's family (and hand-tuned layers) are left as they are
    count = rule_family(LocateConfig())
    assert cost_family(count) == count


def test_surely_fails_holds_for_every_completion_of_the_unseen_images():
    """Brute force over every outcome of the images not yet judged: ``surely_fails`` says so
    exactly when each completion's bound exceeds the budget."""
    import itertools

    from modellego.disassembly import surely_fails

    gen = torch.Generator().manual_seed(4)
    n, budget, confidence = 12, 8.0, 0.9
    checked = {True: 0, False: 0}
    for _ in range(60):
        source = torch.rand(n, generator=gen) < 0.8
        comp = torch.rand(n, generator=gen) < 0.6
        seen = int(torch.randint(1, n, (1,), generator=gen))
        partial = PairedDrop.of(source[:seen], comp[:seen])
        rest = source[seen:]
        bounds = []
        for tail in itertools.product([False, True], repeat=n - seen):
            flags = torch.cat([comp[:seen], torch.tensor(tail, dtype=torch.bool)])
            bounds.append(100 * PairedDrop.of(source, flags).upper(confidence))
        right, wrong = int(rest.sum()), int((~rest).sum())
        got = surely_fails(partial, right, wrong, n, confidence, budget)
        assert got == all(b > budget + 1e-9 for b in bounds)
        checked[got] += 1
    assert checked[True] and checked[False]


def test_the_judge_stops_early_only_where_the_whole_set_fails(monkeypatch):
    """A candidate judged block by block gives the verdict of the whole validation set; a
    candidate that surely fails stops before its last block, one that passes does not."""
    import modellego.disassembly as mod

    monkeypatch.setattr(mod, "default_batch", lambda shape, most=500: 10)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(60, 1, 2, 2)
    with torch.no_grad():
        y = net(x).argmax(1)               # the source is right on every image
    calls = []

    class Wrong(torch.nn.Module):          # wrong on every image
        def forward(self, z):
            calls.append(len(z))
            return -net(z)

    class Same(torch.nn.Module):
        def forward(self, z):
            calls.append(len(z))
            return net(z)

    judge, info = mod.confident_judge(net, [(x, y)], (0, 1, 2), (0, 1, 2),
                                      lambda cfg: cfg, 0.9, 0.5)
    assert info["images"] == 60
    acc, ok, note = judge(Wrong())
    assert not ok and calls == [10] and note.startswith("stopped after 10 of 60 images")
    calls.clear()
    acc, ok, note = judge(Same())
    assert ok and acc == 1.0 and calls == [10] * 6 and "bound 0.00 pp" in note


def test_the_empty_layer_advice_does_not_suggest_the_rule_in_use():
    """A layer the task leaves empty (here a conv whose output nothing reads): the count
    rule's refusal suggests the mass rule; the mass rule's does not suggest itself."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.side = nn.Conv2d(4, 3, 1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            a = torch.relu(self.a(x))
            _ = self.side(a)
            return self.head(a.mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    x, y = torch.randn(30, 1, 6, 6), torch.arange(30) % 3
    messages = {}
    for rule in ("mass", "count"):
        with pytest.raises(ModelLegoError) as info:
            disassemble_model(net, x, y, classes=(0, 1), output_classes=range(3),
                              config=DisassemblyConfig((0, 1), samples_per_class=4,
                                                       preset="paper",
                                                       locate=LocateConfig(rule=rule)))
        messages[rule] = str(info.value)
    assert messages["mass"].startswith("layer 'side' would keep no output channels")
    assert messages["mass"].endswith("try again")
    assert messages["count"].endswith("try again, or use `rule` mass")


def test_task_level_locating_is_the_task_taken_as_one_class(trained, digits) -> None:
    from modellego.analysis.locate import locate, locate_class
    from modellego.analysis.profile import ContributionProfile

    x, y = digits
    comp = disassemble_model(trained, x, y, classes=TASK, output_classes=range(10),
                             config=DisassemblyConfig.paper(TASK, samples_per_class=20))
    graph, prof = comp.graph, comp.profile
    for beta in (0.1, 0.3):
        cfg = LocateConfig(rule="mass", beta_conv=beta, beta_linear=beta)
        task = replace(cfg, task_level=True)
        # one class: the task is that class
        for c in TASK:
            one, merged = (locate(graph, prof, (c,), range(10), k) for k in (cfg, task))
            assert all(torch.equal(one[s], merged[s]) for s in one)
        # several: one class whose statistics are the classes' summed, serving every logit
        rows = [prof.classes.index(c) for c in TASK]
        summed = ContributionProfile((99,), {n: t[rows].sum(0, keepdim=True)
                                            for n, t in prof.layers.items()}, {99: 60}, 0.0)
        want = locate_class(graph, summed, list(TASK), 99, cfg)
        for s in graph.frozen_spaces:
            want[s][:] = True
        got = locate(graph, prof, TASK, range(10), task)
        assert all(torch.equal(got[s], want[s]) for s in got)
        assert got[graph.output_space].nonzero().flatten().tolist() == list(TASK)
    # the union of three classes' masks differs from the task's at the default's steps
    cfg = LocateConfig(rule="mass", beta_conv=0.3, beta_linear=0.3)
    union, task = (locate(graph, prof, TASK, range(10), k)
                   for k in (cfg, replace(cfg, task_level=True)))
    assert any(not torch.equal(union[s], task[s]) for s in union)


def test_task_level_is_recorded_only_when_set() -> None:
    cfg = LocateConfig(rule="mass")
    assert "task_level" not in cfg.to_dict()  # files read as before the field existed
    task = replace(cfg, task_level=True)
    assert task.to_dict()["task_level"] is True
    fields = dict(task.to_dict(), layer_beta=())
    assert LocateConfig(**fields) == task
    # the methods that locate otherwise never get a task-level family
    assert [get_method(m).task_level for m in ("contribution", "contribution-2022", "frat",
                                               "pan-rajan")] == [True, True, False, False]
