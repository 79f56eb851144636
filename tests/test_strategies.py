"""Modulation strategies as plug-ins: registry, each published rule on a hand-made example, the
effect under AdamW, Shapley contributions."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cpsl import strategies
from cpsl.config import Config, ModelConfig
from cpsl.data.batch import make_batch
from cpsl.data.synthetic import SynthSpec, generate
from cpsl.errors import CPSLError
from cpsl.losses import total_loss
from cpsl.metrics import shapley_values
from cpsl.model import CPSLModel
from cpsl.strategies.ags import ags_coefficients, average_grad_norm
from cpsl.strategies.cggm import cggm_coefficients, direction_loss
from cpsl.strategies.inforeg import proximal_beta, window_kappa
from cpsl.strategies.mmpareto import combine, pareto_weights
from cpsl.strategies.moddrop import draw_drops, drop_probabilities
from cpsl.strategies.ogm_ge import ogm_ge_coefficients
from cpsl.train import build_optimizer

ALL = ("none", "cp", "ogm_ge", "cggm", "ags", "mmpareto", "inforeg", "moddrop")


# ---------------------------------------------------------------------------- registry
def test_registry_holds_every_strategy_with_its_config_section():
    assert set(ALL) <= set(strategies.names())
    for n in strategies.names():
        cls = strategies.get(n)
        assert set(cls.needs) <= set(strategies.NEEDS) and set(cls.effects) <= set(strategies.EFFECTS)
        if cls.section:
            assert hasattr(Config(), cls.section), n
    with pytest.raises(CPSLError, match="unknown modulation"):
        strategies.get("sideways")


def test_a_strategy_that_needs_unimodal_heads_refuses_when_they_are_off():
    cfg = Config()
    cfg.loss.aux = 0.0
    for n in ALL:
        cfg.train.modulation = n
        if "unimodal_heads" in strategies.get(n).needs:
            with pytest.raises(CPSLError, match="unimodal heads"):
                strategies.check(cfg)
        elif n == "cp":            # its default stop rule (plateau) reads them too; the original rule does not
            with pytest.raises(CPSLError, match="cp.stop=never"):
                strategies.check(cfg)
            cfg.cp.stop = "never"
            strategies.check(cfg)
        else:
            strategies.check(cfg)


def test_a_new_strategy_registers_and_is_built_by_name():
    @strategies.register
    class Halve(strategies.BaseModulator):
        name = "test_halve"
        effects = frozenset({"scale_grad"})

    try:
        cfg = Config()
        cfg.train.modulation = "test_halve"
        model = CPSLModel({"text": 4, "audio": 3}, ModelConfig(d=8, heads=2))
        mod = strategies.build(cfg, model)
        assert isinstance(mod, Halve) and mod.names == ("text", "audio")
    finally:
        strategies.base._REGISTRY.pop("test_halve")


def test_old_configs_with_cp_modulation_still_load():
    cfg = Config.from_dict({"cp": {"modulation": "ogm_ge", "ogm_alpha": 0.3}})
    assert cfg.train.modulation == "ogm_ge" and cfg.ogm_ge.alpha == 0.3


# ---------------------------------------------------------------------------- published rules
def test_ogm_ge_reduces_to_the_published_two_modality_rule():
    alpha = 0.3
    for s_a, s_v in ((5.0, 2.0), (1.0, 3.0), (2.0, 2.0)):
        rho, k = ogm_ge_coefficients(torch.tensor([s_a, s_v], dtype=torch.float64), alpha)
        # published: ratio_v = s_v / s_a; coeff_v = 1 − tanh(α relu(ratio_v − 1)) if ratio_v > 1 else 1
        ratio_a, ratio_v = s_a / s_v, s_v / s_a
        assert rho.tolist() == pytest.approx([ratio_a, ratio_v])
        assert k.tolist() == pytest.approx([1 - math.tanh(alpha * max(ratio_a - 1, 0)),
                                            1 - math.tanh(alpha * max(ratio_v - 1, 0))])


def test_cggm_coefficients_are_the_published_formula_when_every_modality_improves():
    # msatrain.py: coeff_i = (Σ diff − diff_i) / Σ diff
    for d in ([0.3, 0.1], [0.2, 0.05, 0.05], [0.01, 0.02, 0.03]):
        c = cggm_coefficients(torch.tensor(d, dtype=torch.float64))
        tot = sum(d)
        assert c.tolist() == pytest.approx([(tot - x) / tot for x in d])
    assert cggm_coefficients(torch.tensor([-0.1, 0.05])).tolist() == [1.0, 1.0]   # Σ Δ ≤ 0: no modulation
    assert cggm_coefficients(torch.tensor([-0.1, 0.3, 0.1])).max() <= 2.0          # clamped to [0, M − 1]


def test_cggm_direction_term_is_zero_when_aligned_and_2c_when_opposed():
    c = torch.tensor([0.5, 1.5])
    g = [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])]
    assert float(direction_loss(c, g, g)) == pytest.approx(0.0, abs=1e-6)
    assert float(direction_loss(c, g, [-x for x in g])) == pytest.approx((2 * 0.5 + 2 * 1.5) / 2)


def test_ags_scales_only_the_dominant_encoder_by_the_published_factor():
    alpha = 0.7
    gbar = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    k = ags_coefficients(gbar, alpha)
    ratio = 3.0 / 1.5                         # solver.py: text_grad / ((audio_grad + vision_grad) / 2)
    assert k.tolist() == pytest.approx([1 - math.tanh(alpha * (1 / (1 + 1 / ratio))), 1.0, 1.0])
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    p1.grad, p2.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 1.0])
    assert float(average_grad_norm([p1, p2])) == pytest.approx(math.sqrt((25 + 1) / 2))


def test_mmpareto_weights_and_combination_follow_the_published_code():
    a, b, cos = pareto_weights(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert (a, b) == (0.5, 0.5) and cos > 0
    gmm, gu = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    a, b, cos = pareto_weights(gmm, gu)                    # conflict: min-norm point of the segment
    assert cos < 0 and a == pytest.approx(0.6) and b == pytest.approx(0.4)
    mn = a * gmm + b * gu
    assert float(mn.dot(gmm - gu)) == pytest.approx(0.0, abs=1e-7)
    (new,) = combine([gmm], [gu], a, b, 1.5)
    # 2(a g_mm + b g_u) = (0.4, 0.8) has norm 0.894 < ‖g_mm + g_u‖ = 1 → rescaled to 1, then × γ
    torch.testing.assert_close(new, 1.5 * (2 * mn) / (2 * mn).norm())
    assert float(new.dot(gmm)) > 0 and float(new.dot(gu)) > 0   # a descent direction for both losses


def test_inforeg_window_and_beta_follow_the_published_rule():
    hist = [float(i) for i in range(1, 12)]                  # 11 epochs: main.py's [-10:] and [-11:-1]
    t1, t2 = sum(hist[-10:]) / 10, sum(hist[-11:-1]) / 10
    assert window_kappa(hist, 10) == pytest.approx((t1 - t2) / t1)
    assert window_kappa([5.0], 10) == 1.0                     # epoch 0/1: window open
    d, beta = proximal_beta(torch.tensor([10.0, 7.0], dtype=torch.float64), 0.95)
    assert d == 0 and beta == pytest.approx(0.95 * math.exp(math.tanh(3.0)))


def test_moddrop_never_drops_a_whole_sample_and_drops_the_dominant_more():
    probs = drop_probabilities(torch.tensor([0.3, 0.8, 0.9]), 3, 0.1, 0.5)
    assert probs.tolist() == [0.5, 0.1, 0.1]
    g = torch.Generator().manual_seed(0)
    d = draw_drops(torch.tensor([0.9, 0.9, 0.9], dtype=torch.float64), 4000, g)
    assert not d.all(1).any()
    d = draw_drops(probs, 20000, g)
    assert d[:, 0].float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert d[:, 1].float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_shapley_values_exact_on_known_games():
    players = ("a", "b", "c")
    w = {"a": 1.0, "b": 2.0, "c": 4.0}
    from itertools import combinations
    subsets = [frozenset(s) for k in range(4) for s in combinations(players, k)]
    additive = {S: sum(w[p] for p in S) for S in subsets}
    assert shapley_values(additive, players) == pytest.approx(w)
    # "glove" game: value 1 only when a and b are both in: a and b split it, c gets 0
    glove = {S: float({"a", "b"} <= S) for S in subsets}
    assert shapley_values(glove, players) == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.0})


# ---------------------------------------------------------------------------- under AdamW
def _setup(modulation: str, **section):
    cfg = Config()
    cfg.model = ModelConfig(d=16, heads=2, audio_layers=1, vision_layers=1, dropout=0.0)
    cfg.train.modulation = modulation
    cfg.cp.backend = "foreach"
    for k, v in section.items():
        setattr(getattr(cfg, modulation), k, v)
    data = generate(SynthSpec(n_train=32, n_valid=8, n_test=8, d_text=6, d_audio=4, d_vision=4,
                              text_len=(2, 5), audio_len=(2, 5), vision_len=(2, 5)))
    torch.manual_seed(0)
    model = CPSLModel(data.dims, cfg.model)
    opt = build_optimizer(model, cfg, model.modality_parameters())
    mod = strategies.build(cfg, model, opt)
    mod.bind(opt)
    batch = make_batch(data["train"], np.arange(32))
    return cfg, model, opt, mod, batch


def _steps(modulation, n=1, **section):
    """Parameter change per modality group after ``n`` AdamW steps, and the last StepStats."""
    cfg, model, opt, mod, batch = _setup(modulation, **section)
    groups = model.modality_parameters()
    before = {m: [p.detach().clone() for p in groups[m]] for m in groups}
    st = None
    mod.begin_epoch(5)
    for _ in range(n):
        b = mod.prepare_batch(batch, 5)
        out = model(b.x, b.mask)
        loss, terms = total_loss(out, b.y, cfg.loss, 5)
        step = strategies.Step(5, b, out, terms, loss)
        loss = mod.objective(loss, step)
        opt.zero_grad()
        mod.backward(loss, step)
        st = mod.after_backward(step)
        opt.step()
    change = {m: math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(groups[m], before[m])))
              for m in groups}
    mod.final = {m: torch.cat([p.detach().flatten() for p in groups[m]]) for m in groups}
    return change, st, mod


@pytest.mark.parametrize("modulation,section", [("ogm_ge", {"ge": False, "alpha": 100.0}), ("ags", {"alpha": 2.0}),
                                                ("cggm", {"rho": 0.3, "lam": 0.0})])
def test_scaling_strategies_shrink_the_penalised_groups_step_under_adamw(modulation, section):
    free, _, _ = _steps("none")
    got, st, _ = _steps(modulation, **section)
    k = st.k.tolist()
    assert min(k) < 0.9
    for gi, m in enumerate(("text", "audio", "vision")):
        # AdamW's first step moves each parameter by ~lr: the change scales with the group's lr factor
        assert got[m] / free[m] == pytest.approx(k[gi], rel=0.05), (m, k)


def test_grad_mode_warns_under_adamw():
    with pytest.warns(UserWarning, match="Adam"):
        _setup("ags", mode="grad")


def test_mmpareto_replaces_encoder_gradients_and_changes_the_adamw_update():
    cfg, model, opt, mod, batch = _setup("mmpareto")
    out = model(batch.x, batch.mask)
    loss, terms = total_loss(out, batch.y, cfg.loss, 5)
    enc = model.modality_parameters()["audio"]
    g_all = torch.autograd.grad(loss, enc, retain_graph=True)
    g_u = torch.autograd.grad(torch.nn.functional.l1_loss(out.aux["audio"], batch.y), enc, retain_graph=True)
    g_mm = [x - cfg.loss.aux / 3 * y for x, y in zip(g_all, g_u)]
    a, b, _ = pareto_weights(torch.cat([x.flatten() for x in g_mm]), torch.cat([y.flatten() for y in g_u]))
    expect = combine(g_mm, list(g_u), a, b, cfg.mmpareto.gamma)
    opt.zero_grad()
    mod.backward(loss, strategies.Step(5, batch, out, terms, loss))
    for p, e in zip(enc, expect):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    _, _, free = _steps("none", n=2)
    _, _, got = _steps("mmpareto", n=2)
    # Adam's first steps move every element by ~lr whatever the factor; the direction differs
    assert all(not torch.allclose(got.final[m], free.final[m], atol=1e-6) for m in free.final)


def test_inforeg_keeps_the_dominant_encoder_near_its_epoch_anchor_under_adamw():
    free, _, _ = _steps("none", n=6)
    got, st, mod = _steps("inforeg", n=6, beta=50.0)
    d = int(torch.argmin(st.k))                     # the regulated (dominant) group is logged with k = 0
    m = ("text", "audio", "vision")[d]
    assert st.k[d] == 0 and got[m] < 0.8 * free[m]
    rec = mod.end_epoch(5)
    assert rec["regulated_steps"] == 6 and set(rec["fisher_trace"]) == {"text", "audio", "vision"}


def test_moddrop_masks_whole_modalities_as_eval_does():
    cfg, model, opt, mod, batch = _setup("moddrop", p=0.0, p_dominant=1.0)
    mod.ema = torch.tensor([0.1, 0.5, 0.5], dtype=torch.float64)     # text dominant
    x0 = batch.x["text"].clone()
    b = mod.prepare_batch(batch, 0)
    assert torch.all(b.x["text"] == 0) and b.mask["text"][:, 0].all() and not b.mask["text"][:, 1:].any()
    assert torch.equal(b.x["audio"], batch.x["audio"]) and x0.abs().sum() > 0
    _, _, free = _steps("none", n=2)
    _, _, got = _steps("moddrop", n=2, p=0.0, p_dominant=1.0)   # step 1 finds the dominant, step 2 drops it
    assert not torch.allclose(got.final["text"], free.final["text"], atol=1e-6)
