"""Conflict-aware Penalty: backends agree, the rule, the schedule, grad/update modes (OGM-GE and the
other strategies: tests/test_strategies.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cpsl.config import CPConfig
from cpsl.cp import PenaltyParams, get_backend
from cpsl.cp.core import CPStats, backend_names, penalty_scalar
from cpsl.cp.penalty import ConflictAwarePenalty, schedule_weight
from cpsl.strategies.base import bind_group_lrs

_NATIVE = get_backend("native").available()[0] if "native" in backend_names() else False


def random_grads(rng, n_tensors, n_groups, scale_by_group=None, allow_none=True):
    grads, gidx = [], []
    for i in range(n_tensors):
        g = int(rng.integers(0, n_groups))
        shape = tuple(int(s) for s in rng.integers(0, 9, size=int(rng.integers(1, 3))))
        if allow_none and rng.random() < 0.1:
            grads.append(None)
        else:
            t = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            if scale_by_group is not None:
                t = t * scale_by_group[g]
            grads.append(t)
        gidx.append(g)
    return grads, gidx


def assert_same_stats(a, b, G):
    A, B = CPStats.unpack(a, G), CPStats.unpack(b, G)
    torch.testing.assert_close(A.sumsq, B.sumsq, rtol=1e-6, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(A.ghat, B.ghat, rtol=1e-6, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(A.r, B.r, rtol=1e-6, atol=1e-9)
    assert torch.equal(A.conflict, B.conflict)
    assert torch.equal(A.guard, B.guard)
    torch.testing.assert_close(A.k, B.k, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_tensors=st.integers(1, 40), n_groups=st.integers(1, 4),
       normalize=st.booleans(), penalty=st.sampled_from(["tanh", "fixed", "ratio"]),
       w=st.sampled_from([0.0, 0.5, 1.0]))
def test_backends_match_reference(seed, n_tensors, n_groups, normalize, penalty, w):
    """foreach, and native where the extension is built, against the reference, every cp.penalty mode."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.01, 10, size=n_groups)
    grads, gidx = random_grads(rng, n_tensors, n_groups, scale)
    p = PenaltyParams(normalize=normalize, penalty=penalty)
    ref = get_backend("reference").compute(grads, gidx, n_groups, p, w)
    for be in ["foreach"] + (["native"] if _NATIVE else []):
        assert_same_stats(ref, get_backend(be).compute(grads, gidx, n_groups, p, w), n_groups)


def test_many_tensors_empty_groups_zeros_and_nonfinite():
    rng = np.random.default_rng(0)
    grads, gidx = random_grads(rng, 1500, 3, [5.0, 1.0, 0.2])
    gidx = [g if g != 1 else 3 for g in gidx]           # group 1 empty, group 3 present
    p = PenaltyParams()
    for extra in ([], [torch.zeros(5)]):
        ref = get_backend("reference").compute(grads + extra, gidx + [2] * len(extra), 4, p, 1.0)
        fe = get_backend("foreach").compute(grads + extra, gidx + [2] * len(extra), 4, p, 1.0)
        assert_same_stats(ref, fe, 4)
        s = CPStats.unpack(ref, 4)
        assert s.ghat[1] == 0 and s.r[1] == 0 and s.k[1] == 1 and s.conflict[1] == 0
    zeros = [torch.zeros(3), torch.zeros(4)]
    for be in ("reference", "foreach"):
        s = CPStats.unpack(get_backend(be).compute(zeros, [0, 1], 2, p, 1.0), 2)
        assert torch.equal(s.k, torch.ones(2, dtype=torch.float64)) and s.conflict.sum() == 0 and s.guard == 0
    for bad in (float("inf"), float("nan")):
        g = [torch.tensor([1.0, bad]), torch.ones(3) * 100]
        for be in ("reference", "foreach"):
            s = CPStats.unpack(get_backend(be).compute(g, [0, 1], 2, p, 1.0), 2)
            assert s.guard == 1 and torch.equal(s.k, torch.ones(2, dtype=torch.float64)) and s.conflict.sum() == 0


TANH = PenaltyParams(penalty="tanh")


def test_rule_by_hand_only_conflicting_groups_penalised():
    # norms 6, 2, 1 → ḡ = 3 → r = 2, 2/3, 1/3; τ = 1.2 → only group 0 conflicts
    grads = [torch.tensor([6.0]), torch.tensor([2.0]), torch.tensor([1.0])]
    for be in ("reference", "foreach") + (("native",) if _NATIVE else ()):
        s = CPStats.unpack(get_backend(be).compute(grads, [0, 1, 2], 3, TANH, 1.0), 3)
        assert s.r.tolist() == pytest.approx([2.0, 2 / 3, 1 / 3])
        assert s.conflict.tolist() == [1.0, 0.0, 0.0]
        assert s.k[0].item() == pytest.approx(1 - math.tanh(0.5 * 1.0))
        assert s.k[1:].tolist() == [1.0, 1.0]
        # schedule weight halves the penalty
        s2 = CPStats.unpack(get_backend(be).compute(grads, [0, 1, 2], 3, TANH, 0.5), 3)
        assert s2.k[0].item() == pytest.approx(1 + 0.5 * (-math.tanh(0.5)))
        # fixed mode and the k_min clamp
        s3 = CPStats.unpack(get_backend(be).compute(grads, [0, 1, 2], 3, PenaltyParams(penalty="fixed", beta=0.3), 1.0), 3)
        assert s3.k.tolist() == pytest.approx([0.3, 1, 1])
        s4 = CPStats.unpack(get_backend(be).compute(grads, [0, 1, 2], 3, PenaltyParams(penalty="tanh", alpha=50, k_min=0.2), 1.0), 3)
        assert s4.k[0].item() == pytest.approx(0.2)
        # ratio mode: min of the others' norms (1) over its own (6), then the k_min clamp and the schedule
        s5 = CPStats.unpack(get_backend(be).compute(grads, [0, 1, 2], 3, PenaltyParams(penalty="ratio"), 1.0), 3)
        assert s5.k.tolist() == pytest.approx([1 / 6, 1, 1])
        s6 = CPStats.unpack(get_backend(be).compute(grads, [0, 1, 2], 3, PenaltyParams(penalty="ratio", k_min=0.25), 0.5), 3)
        assert s6.k.tolist() == pytest.approx([1 + 0.5 * (0.25 - 1), 1, 1])


def test_normalize_uses_rms():
    # group 0: one element of 4 (rms 4); group 1: 16 elements of 1 (norm 4, rms 1)
    grads = [torch.tensor([4.0]), torch.ones(16)]
    raw = penalty_scalar([16.0, 16.0], [1, 16], [True, True], PenaltyParams(normalize=False), 1.0)
    nrm = penalty_scalar([16.0, 16.0], [1, 16], [True, True], PenaltyParams(normalize=True), 1.0)
    assert raw[2:4] == [4.0, 4.0] and raw[8:10] == [0.0, 0.0]          # equal norms: no conflict
    assert nrm[2:4] == [4.0, 1.0] and nrm[8:10] == [1.0, 0.0]          # rms: group 0 conflicts
    s = get_backend("foreach").compute(grads, [0, 1], 2, PenaltyParams(normalize=True), 1.0)
    assert CPStats.unpack(s, 2).conflict.tolist() == [1.0, 0.0]


def test_single_active_group_never_conflicts():
    s = CPStats.unpack(get_backend("reference").compute([torch.ones(3) * 9, None], [0, 1], 2, PenaltyParams(), 1.0), 2)
    assert s.conflict.sum() == 0 and s.k.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("start,ramp,end", [(0, 0, 10), (2, 0, 5), (2, 3, 9), (0, 4, 1)])
def test_schedule_boundaries_exact(start, ramp, end):
    for e in range(0, 15):
        w = schedule_weight(e, start, ramp, end)
        if e < start or e > end:
            assert w == 0.0
        elif ramp == 0:
            assert w == 1.0
        else:
            assert w == min(1.0, (e - start + 1) / ramp)
    assert schedule_weight(start - 1, start, ramp, end) == 0.0 if start > 0 else True
    assert schedule_weight(end + 1, start, ramp, end) == 0.0


def _toy(seed=0):
    torch.manual_seed(seed)
    enc = torch.nn.ModuleDict({"text": torch.nn.Linear(8, 8), "audio": torch.nn.Linear(8, 8)})
    return enc


def _backward(enc, big=20.0):
    x = torch.randn(16, 8)
    loss = (big * enc["text"](x)).pow(2).mean() + enc["audio"](x).pow(2).mean()
    loss.backward()


def test_grad_mode_scales_exactly():
    enc = _toy()
    groups = {m: list(enc[m].parameters()) for m in enc}
    cp = ConflictAwarePenalty(groups, CPConfig(mode="grad", backend="foreach"))
    _backward(enc)
    before = {n: p.grad.clone() for n, p in enc.named_parameters()}
    st_ = cp.step(epoch=0).stats
    assert st_.conflict.tolist() == [1.0, 0.0]
    k = st_.k.float()
    for n, p in enc.named_parameters():
        gi = 0 if n.startswith("text") else 1
        torch.testing.assert_close(p.grad, before[n] * k[gi], rtol=0, atol=0)
    assert k[0] < 1 and k[1] == 1


def _param_change(mode, penalise=True, steps=5):
    torch.manual_seed(0)
    enc = _toy()
    groups = {m: list(enc[m].parameters()) for m in enc}
    opt = torch.optim.AdamW([{"params": groups[m], "lr": torch.tensor(1e-2)} for m in groups], fused=True)
    cfg = CPConfig(mode=mode, backend="foreach", penalty="fixed", beta=0.1,
                   start_epoch=0 if penalise else 99)
    cp = ConflictAwarePenalty(groups, cfg, lr_slots=bind_group_lrs(opt, groups) if mode == "update" else None)
    start = [p.detach().clone() for p in groups["text"]]
    for _ in range(steps):
        opt.zero_grad()
        _backward(enc)
        s = cp.step(epoch=0).stats
        opt.step()
    assert s.conflict[0] == 1
    return sum((p.detach() - q).norm().item() for p, q in zip(groups["text"], start))


def test_update_mode_shrinks_the_penalised_groups_step_under_adamw_but_grad_mode_barely_does():
    free = _param_change("update", penalise=False)
    upd = _param_change("update")
    grd = _param_change("grad")
    assert upd < 0.2 * free            # k = 0.1 on the learning rate: the step shrinks ~10×
    assert abs(grd - free) / free < 0.1  # Adam divides a constant gradient factor away


def test_update_mode_leaves_unpenalised_groups_alone():
    torch.manual_seed(0)
    enc = _toy()
    groups = {m: list(enc[m].parameters()) for m in enc}
    opt = torch.optim.AdamW([{"params": groups[m], "lr": torch.tensor(1e-2)} for m in groups], fused=True)
    cp = ConflictAwarePenalty(groups, CPConfig(backend="foreach"), lr_slots=bind_group_lrs(opt, groups))
    _backward(enc)
    s = cp.step(0).stats
    assert opt.param_groups[1]["lr"].item() == pytest.approx(1e-2)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 * s.k[0].item())


def test_frozen_and_gradless_groups():
    enc = _toy()
    vis = torch.nn.Linear(3, 3)
    for p in vis.parameters():
        p.requires_grad_(False)
    groups = {"text": list(enc["text"].parameters()), "audio": list(enc["audio"].parameters()),
              "vision": list(vis.parameters())}
    cp = ConflictAwarePenalty(groups, CPConfig(mode="grad", backend="foreach"))
    _backward(enc)
    s = cp.step(0).stats
    assert s.k[2] == 1 and s.ghat[2] == 0 and s.conflict[2] == 0
    enc.zero_grad(set_to_none=True)   # a step where no group has gradients
    s = cp.step(0).stats
    assert s.k.tolist() == [1, 1, 1] and s.conflict.sum() == 0


def test_ge_noise_only_on_penalised_groups():
    torch.manual_seed(0)
    enc = _toy()
    groups = {m: list(enc[m].parameters()) for m in enc}
    cp = ConflictAwarePenalty(groups, CPConfig(mode="grad", backend="foreach", ge_noise=1.0, penalty="fixed", beta=1.0))
    _backward(enc)
    before = {n: p.grad.clone() for n, p in enc.named_parameters()}
    cp.step(0)
    # β = 1: k = 1 everywhere, so any change is noise; but noise needs k < 1 too → none
    assert all(torch.equal(before[n], p.grad) for n, p in enc.named_parameters())
    cp2 = ConflictAwarePenalty(groups, CPConfig(mode="grad", backend="foreach", ge_noise=1.0, penalty="fixed", beta=0.5))
    enc.zero_grad()
    _backward(enc)
    before = {n: p.grad.clone() for n, p in enc.named_parameters()}
    cp2.step(0)
    assert not torch.allclose(enc["text"].weight.grad, before["text.weight"] * 0.5)
    torch.testing.assert_close(enc["audio"].weight.grad, before["audio.weight"])


def test_no_modulation_still_measures_the_balance_and_changes_nothing():
    from cpsl.config import Config
    from cpsl.strategies.none import NoModulation
    enc = _toy()
    groups = {m: list(enc[m].parameters()) for m in enc}
    cfg = Config()
    cfg.cp.backend = "foreach"
    none = NoModulation(groups, cfg)
    _backward(enc)
    before = {n: p.grad.clone() for n, p in enc.named_parameters()}
    s = none.step(0)
    assert s.conflict.tolist() == [1.0, 0.0] and s.r[0] > 1.2       # the imbalance is detected...
    assert s.k.tolist() == [1.0, 1.0]                                # ...and nothing is applied
    assert all(torch.equal(before[n], p.grad) for n, p in enc.named_parameters())
    cfg.groups.diagnostics = False
    assert NoModulation(groups, cfg).step(0) is None
