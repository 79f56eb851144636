"""The ``native`` CP backend (cpsl._C, csrc/) against the float64 ``reference`` oracle.

CPU tests run everywhere the extension is built (the CUDA tests are in
test_cp_native_cuda.py, which needs nothing beyond pytest and torch).
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from cpsl import native_info
from cpsl.cp import native
from cpsl.cp.core import CPStats, PenaltyParams, get_backend, penalty_control, signal_state, stats_size
from cpsl.cp.reference import reference_stats
from cpsl.cp.testing import assert_matches, clone, expected_scaled, make_grads, stats_with_k

_OK, _WHY = native.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"native CP kernels unavailable: {_WHY}")

try:  # the property test needs hypothesis; every other test runs without it
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - depends on the environment
    st = None

P = PenaltyParams()
PENALTIES = ["tanh", "fixed", "ratio"]  # cp.penalty: the factor rule of a conflicting group


def with_penalty(mode: str, **kw) -> PenaltyParams:
    return PenaltyParams(penalty=mode, **kw)
_stats_with_k = stats_with_k


def not_borderline(ref: torch.Tensor, G: int, tau: float) -> bool:
    r = CPStats.unpack(ref, G).r
    return bool(((r - tau).abs() > 1e-5 * tau).all())


@pytest.fixture(params=["auto", "generic"])
def isa(request):
    """Run a test with the dispatched CPU kernels (avx2 here) and with the baseline ones."""
    assert native.set_cpu_isa(request.param)
    yield native.cpu_isa()
    native.set_cpu_isa("auto")


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("w", [0.0, 0.4, 1.0])
def test_parity_fixed_layout(isa, normalize, penalty, w):
    sizes = [1000, 65536 * 2 + 17, 0, 5, 300000, 33, 7, 129]
    groups = [0, 1, 1, 2, 0, 3, 0, 2]
    present = [True, True, True, True, True, False, True, True]  # group 3: no gradient (frozen)
    grads = make_grads(sizes, groups, present=present, scales=[3.0, 0.5, 1.0, 1.0], seed=1)
    grads[6] = torch.randn(8)[1:]  # data pointer 4 bytes past the allocation: misaligned for vector loads
    p = PenaltyParams(normalize=normalize, penalty=penalty)
    ref = reference_stats(grads, groups, 5, p, w)  # group 4: no parameters at all
    nat = native.cp_stats(grads, groups, 5, p, w)
    assert_matches(nat, ref, 5)
    assert CPStats.unpack(nat, 5).conflict.sum() >= 1  # the layout really exercises the penalty


if st is None:
    @pytest.mark.skip(reason="hypothesis is not installed (pip install hypothesis)")
    def test_parity_random_layouts():
        pass
else:
    @st.composite
    def layouts(draw):
        G = draw(st.integers(1, 5))
        n = draw(st.integers(0, 40))
        size = st.one_of(st.integers(0, 300), st.integers(0, 20000),
                         st.sampled_from([0, 1, 7, 8, 255, 256, 257, 65535, 65536, 65537]))
        sizes = draw(st.lists(size, min_size=n, max_size=n))
        groups = draw(st.lists(st.integers(0, G - 1), min_size=n, max_size=n))
        present = draw(st.lists(st.sampled_from([True, True, True, True, False]), min_size=n, max_size=n))
        dtypes = draw(st.lists(st.sampled_from(["float32", "float32", "float16", "bfloat16"]), min_size=n, max_size=n))
        scales = draw(st.lists(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 3.0, 30.0]), min_size=G, max_size=G))
        p = PenaltyParams(tau=draw(st.sampled_from([0.8, 1.2, 2.0])), alpha=draw(st.sampled_from([0.5, 2.0])),
                          k_min=draw(st.sampled_from([0.1, 0.6])), beta=draw(st.sampled_from([0.5, 0.9])),
                          normalize=draw(st.booleans()))
        p = with_penalty(draw(st.sampled_from(PENALTIES)), **{k: getattr(p, k) for k in ("tau", "alpha", "k_min",
                                                                                          "beta", "normalize")})
        w = draw(st.sampled_from([0.0, 0.5, 1.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        return G, sizes, groups, present, dtypes, scales, p, w, seed


    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(layouts())
    def test_parity_random_layouts(layout):
        G, sizes, groups, present, dtypes, scales, p, w, seed = layout
        grads = make_grads(sizes, groups, dtypes, present, scales, seed)
        ref = reference_stats(grads, groups, G, p, w)
        assume(not_borderline(ref, G, p.tau))
        nat = native.cp_stats(grads, groups, G, p, w)
        assert_matches(nat, ref, G)
        # scale pass: grad <- (float)k[group] * grad, exactly; step_ = stats + scale
        k = CPStats.unpack(nat, G).k.tolist()
        scaled, stepped = clone(grads), clone(grads)
        native.cp_scale_(scaled, groups, nat, G)
        st2 = native.cp_step_(stepped, groups, G, p, w)
        assert torch.equal(st2, nat)
        for g, a, b, m in zip(grads, scaled, stepped, groups):
            if g is None:
                continue
            exp = expected_scaled(g, k[m])
            assert torch.equal(a, exp) and torch.equal(b, exp)


def test_more_than_1000_tensors():
    n = 1500
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 60, (n,), generator=gen).tolist()
    groups = torch.randint(0, 4, (n,), generator=gen).tolist()
    present = (torch.rand(n, generator=gen) > 0.1).tolist()
    grads = make_grads(sizes, groups, present=present, scales=[5.0, 1.0, 1.0, 0.2], seed=4)
    ref = reference_stats(grads, groups, 4, P, 1.0)
    assert_matches(native.cp_stats(grads, groups, 4, P, 1.0), ref, 4)


def test_large_group_accuracy(isa):
    """Millions of elements spanning 8 decades in one group: fp32 runs flushed to float64 keep 1e-6."""
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(3_000_001, generator=gen) * torch.exp(torch.randn(3_000_001, generator=gen) * 4)
    grads = [big, torch.randn(1000, generator=gen), big[:12345].clone().half()]
    ref = reference_stats(grads, [0, 1, 2], 3, P, 1.0)
    nat = native.cp_stats(grads, [0, 1, 2], 3, P, 1.0)
    assert_matches(nat, ref, 3, rtol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_and_mixed(isa, dtype):
    sizes = [70001, 513, 9, 4096]
    groups = [0, 1, 2, 1]
    grads = make_grads(sizes, groups, [dtype, dtype, "float32", dtype], scales=[4.0, 0.5, 1.0], seed=6)
    ref = reference_stats(grads, groups, 3, P, 1.0)
    nat = native.cp_stats(grads, groups, 3, P, 1.0)
    assert_matches(nat, ref, 3)
    assert CPStats.unpack(nat, 3).conflict[0] == 1


# ------------------------------------------------------------------ edge cases
def test_all_zero_gradients():
    grads = [torch.zeros(100), torch.zeros(70000), torch.zeros(3).bfloat16()]
    nat = native.cp_stats(grads, [0, 1, 2], 3, P, 1.0)
    s = CPStats.unpack(nat, 3)
    assert s.sumsq.tolist() == [0.0] * 3 and s.r.tolist() == [0.0] * 3
    assert s.k.tolist() == [1.0] * 3 and s.conflict.tolist() == [0.0] * 3 and float(s.guard) == 0.0
    assert_matches(nat, reference_stats(grads, [0, 1, 2], 3, P, 1.0), 3)


def test_no_gradients_at_all():
    for grads, gi in (([None, None], [0, 1]), ([], []), ([torch.zeros(0), None], [1, 0])):
        nat = native.cp_stats(grads, gi, 2, P, 1.0)
        assert nat.device.type == "cpu"
        assert nat.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        assert torch.equal(nat, reference_stats(grads, gi, 2, P, 1.0))
        native.cp_scale_(grads, gi, nat, 2)  # nothing to do, must not fail


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_trips_the_guard(isa, bad, dtype):
    grads = [torch.randn(70000) * 10, torch.randn(100), torch.randn(50)]
    grads[1][17] = bad
    grads = [g.to(dtype) for g in grads]
    before = clone(grads)
    ref = reference_stats(grads, [0, 1, 2], 3, P, 1.0)
    assert float(ref[-1]) == 1.0
    nat = native.cp_step_(grads, [0, 1, 2], 3, P, 1.0)
    assert_matches(nat, ref, 3)
    assert CPStats.unpack(nat, 3).k.tolist() == [1.0] * 3
    for a, b in zip(grads, before):  # guard: every factor is 1, the gradients are left untouched
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_inactive_groups_are_neutral():
    grads = [torch.randn(10) * 100, None, torch.zeros(0), torch.randn(10)]
    gi = [0, 1, 2, 3]
    nat = native.cp_stats(grads, gi, 6, P, 1.0)
    s = CPStats.unpack(nat, 6)
    for m in (1, 2, 4, 5):
        assert (float(s.ghat[m]), float(s.r[m]), float(s.k[m]), float(s.conflict[m])) == (0.0, 0.0, 1.0, 0.0)
    assert_matches(nat, reference_stats(grads, gi, 6, P, 1.0), 6)


def test_single_active_group_never_conflicts():
    grads = [torch.randn(100) * 100, None]
    nat = native.cp_stats(grads, [0, 1], 2, PenaltyParams(tau=0.5), 1.0)
    assert CPStats.unpack(nat, 2).conflict.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ determinism
def test_bit_identical_runs_and_thread_counts():
    sizes = [3_000_000, 70000, 65536 * 3 + 5, 99, 1]
    groups = [0, 1, 0, 2, 1]
    grads = make_grads(sizes, groups, ["float32", "bfloat16", "float32", "float16", "float32"],
                       scales=[1.0, 3.0, 1.0], seed=7)
    prev = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2, 3, 1):
            torch.set_num_threads(nt)
            results.append(native.cp_stats(grads, groups, 3, P, 1.0))
    finally:
        torch.set_num_threads(prev)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    # the extension's own thread argument, bypassing torch's setting
    C = native._load()
    plan = native._plan_for(grads, groups, 3)
    outs = []
    for nt in (1, 2, 5):
        out = torch.empty(stats_size(3), dtype=torch.float64)
        C.cp_stats(plan.table.data_ptr(), plan.n_chunks, plan.group_info.data_ptr(), 3,
                   plan.partials.data_ptr(), out.data_ptr(), native.pack_penalty(P, 1.0), n_threads=nt)
        outs.append(out)
    assert all(torch.equal(o, results[0]) for o in outs)


def test_isa_paths_agree_with_reference():
    grads = make_grads([200003, 4097, 31], [0, 1, 1], ["float32", "float16", "bfloat16"], scales=[2.0, 1.0])
    ref = reference_stats(grads, [0, 1, 1], 2, P, 1.0)
    try:
        for isa_name in ("generic", "avx2"):
            if not native.set_cpu_isa(isa_name):
                continue
            assert native.cpu_isa() == isa_name
            assert_matches(native.cp_stats(grads, [0, 1, 1], 2, P, 1.0), ref, 2, rtol=1e-7)
    finally:
        native.set_cpu_isa("auto")


# ------------------------------------------------------------------ scale pass exactness
def _stats_with_k(ks):
    G = len(ks)
    s = torch.zeros(stats_size(G), dtype=torch.float64)
    s[3 * G:4 * G] = torch.tensor(ks, dtype=torch.float64)
    return s


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [0.5, 2.0, 1.0 / 3.0, 0.7310585786300049, 1e-4])
def test_scale_every_16bit_pattern(isa, dtype, k):
    """All 65536 encodings (subnormals, inf, nan, overflow, ties) round exactly like torch."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).clone()
    got = x.clone()
    native.cp_scale_([got], [0], _stats_with_k([k]), 1)
    exp = expected_scaled(x, k)
    nan = exp.float().isnan()
    assert torch.equal(got.float().isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), exp[~nan].view(torch.int16))


def test_scale_fp32_and_unit_factor_untouched(isa):
    a = torch.randn(65536 * 2 + 3)
    b = torch.randn(77)
    c = torch.tensor([-0.0, 0.0, math.inf, -math.inf, 1e-45, 3e38])
    ga, gb, gc = a.clone(), b.clone(), c.clone()
    native.cp_scale_([ga, gb, gc], [0, 1, 0], _stats_with_k([0.3, 1.0]), 2)
    assert torch.equal(ga, expected_scaled(a, 0.3))
    assert torch.equal(gc, expected_scaled(c, 0.3))
    assert torch.equal(gb, b)


def test_sumsq_decodes_every_16bit_value(isa):
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        x = x[x.float().isfinite() & (x.float().abs() < 1e18)].contiguous()
        ref = reference_stats([x], [0], 1, P, 1.0)
        assert_matches(native.cp_stats([x], [0], 1, P, 1.0), ref, 1)


# ------------------------------------------------------------------ backend, plans
def test_registered_backend_matches_reference_and_base_scale():
    be = get_backend("native")
    assert be.available() == (True, "")
    grads = make_grads([5000, 300, 70000], [0, 1, 2], scales=[10.0, 1.0, 1.0], seed=9)
    ref = reference_stats(grads, [0, 1, 2], 3, P, 1.0)
    stats = be.compute(grads, [0, 1, 2], 3, P, 1.0)
    assert_matches(stats, ref, 3)
    mine, base = clone(grads), clone(grads)
    be.scale_(mine, [0, 1, 2], stats, 3)
    get_backend("reference").scale_(base, [0, 1, 2], stats, 3)  # the Backend default: grad.mul_(k)
    assert all(torch.equal(a, b) for a, b in zip(mine, base))  # identical for fp32


def test_plan_cache_hits_and_rebuilds():
    native.clear_cache()
    grads = make_grads([100, 70000], [0, 1])
    p1 = native._plan_for(grads, [0, 1], 2)
    assert native._plan_for(list(grads), [0, 1], 2) is p1  # same pointers -> cached
    assert p1.n_chunks == 1 + 2 and p1.total == 70100
    grads2 = [grads[0], torch.randn(5)]  # new storage -> new plan, right result
    p2 = native._plan_for(grads2, [0, 1], 2)
    assert p2 is not p1 and p2.total == 105
    assert_matches(native.cp_stats(grads2, [0, 1], 2, P, 1.0), reference_stats(grads2, [0, 1], 2, P, 1.0), 2)
    assert native._plan_for(grads, [1, 0], 2) is not p1  # group ids are part of the key
    for i in range(native.MAX_PLANS + 3):
        native.cp_stats([torch.randn(10 + i)], [0], 1, P, 1.0)
    assert len(native._plans) == native.MAX_PLANS


def test_available_says_why_when_the_extension_is_stale(monkeypatch):
    fake = types.ModuleType("cpsl._C")
    fake.build_info = lambda: {}
    monkeypatch.setitem(sys.modules, "cpsl._C", fake)
    import cpsl
    monkeypatch.setattr(cpsl, "_C", fake, raising=False)
    monkeypatch.setattr(native_info, "_ext", None)  # the one loader: load again, and see the stale module
    monkeypatch.setattr(native_info, "_err", None)
    ok, why = native.available()
    assert not ok and "stale" in why and "cp_stats" in why and f"!= {native_info.CP_ABI}" in why
    with pytest.raises(RuntimeError, match="unavailable"):
        native.cp_stats([torch.ones(3)], [0], 1, P, 1.0)


# ------------------------------------------------------------------ argument errors
def test_python_side_argument_errors():
    good = torch.randn(10)
    with pytest.raises(TypeError, match=r"grads\[1\].*float64"):
        native.cp_stats([good, torch.randn(3, dtype=torch.float64)], [0, 0], 1, P, 1.0)
    with pytest.raises(ValueError, match=r"grads\[0\] is neither contiguous nor dense"):
        native.cp_stats([torch.randn(4, 6)[:, ::2]], [0], 1, P, 1.0)
    with pytest.raises(ValueError, match=r"grads\[1\] is on meta"):
        native.cp_stats([good, torch.empty(3, device="meta")], [0, 0], 1, P, 1.0)
    with pytest.raises(ValueError, match=r"group_index\[1\] = 3 is out of range"):
        native.cp_stats([good, good.clone()], [0, 3], 2, P, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        native.cp_stats([good], [0, 1], 2, P, 1.0)
    with pytest.raises(TypeError, match=r"grads\[0\] is a list"):
        native.cp_stats([[1.0]], [0], 1, P, 1.0)
    stats = native.cp_stats([good], [0], 1, P, 1.0)
    with pytest.raises(ValueError, match="length 5\\*n_groups\\+1"):
        native.cp_scale_([good], [0], stats[:-1], 1)
    with pytest.raises(ValueError, match="float64"):
        native.cp_scale_([good], [0], stats.float(), 1)


def _raw(rows, ginfo):
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), torch.tensor(ginfo, dtype=torch.int64).reshape(-1, 3)


def test_extension_argument_errors_name_the_argument():
    C = native._load()
    x = torch.randn(64)
    ptr = x.data_ptr()
    cases = [
        ([[ptr, 64, 7, 0]], [[64, 0, 1]], 1, "bad dtype code 7"),
        ([[ptr, 64, 0, 2]], [[64, 0, 1]], 1, "group id 2 out of range"),
        ([[0, 64, 0, 0]], [[64, 0, 1]], 1, "null data pointer"),
        ([[ptr + 2, 31, 0, 0]], [[31, 0, 1]], 1, "not aligned"),
        ([[ptr, 0, 0, 0]], [[0, 0, 1]], 1, "chunk length"),
        ([[ptr, 64, 0, 0]], [[60, 0, 1]], 1, "does not match"),
        ([[ptr, 64, 0, 1]], [[64, 0, 1], [0, 1, 1]], 2, "belongs to another group"),
        ([[ptr, 32, 0, 1], [ptr, 32, 0, 0]], [[32, 0, 1], [32, 1, 2]], 2, "ordered by group"),
        ([[ptr, 64, 0, 0]], [[64, 0, 1], [0, 2, 2]], 2, "sizes mismatch"),
    ]
    for rows, ginfo, G, msg in cases:
        t, g = _raw(rows, ginfo)
        with pytest.raises(ValueError, match=msg):
            C.cp_validate(t.data_ptr(), t.shape[0], g.data_ptr(), G)
    t, g = _raw([[ptr, 64, 0, 0]], [[64, 0, 1]])
    assert C.cp_validate(t.data_ptr(), 1, g.data_ptr(), 1) == 64
    out = torch.empty(stats_size(1), dtype=torch.float64)
    part = torch.empty(1, dtype=torch.float64)
    pen = native.pack_penalty(P, 1.0)
    with pytest.raises(ValueError, match="n_groups must be in"):
        C.cp_validate(t.data_ptr(), 1, g.data_ptr(), 0)
    with pytest.raises(ValueError, match="group_info is a null pointer"):
        C.cp_validate(t.data_ptr(), 1, 0, 1)
    with pytest.raises(ValueError, match="table is a null pointer"):
        C.cp_stats(0, 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(), pen)
    with pytest.raises(ValueError, match="stats is a null pointer"):
        C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), 0, pen)
    with pytest.raises(ValueError, match="partials is a null pointer"):
        C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, 0, out.data_ptr(), pen, scale=True)
    with pytest.raises(ValueError, match="stats is a null pointer"):
        C.cp_scale(t.data_ptr(), 1, 1, 0)
    with pytest.raises(ValueError, match="n_chunks must be >= 0"):
        C.cp_scale(t.data_ptr(), -1, 1, out.data_ptr())
    # the packed penalty argument: its length, the mode, the EMA's beta and state
    fields = list(C.PENALTY_FIELDS)
    assert len(pen) == len(fields) and pen[fields.index("mode")] == C.PENALTY_MODES[P.penalty]
    for i, v, msg in ((None, None, "penalty must hold 9 values"), (fields.index("mode"), 3.0, "penalty mode must be"),
                      (fields.index("mode"), 0.5, "penalty mode must be")):
        bad_pen = pen[:-1] if i is None else pen[:i] + (v,) + pen[i + 1:]
        with pytest.raises(ValueError, match=msg):
            C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(), bad_pen)
    ema = native.pack_penalty(PenaltyParams(ema=True, ema_beta=0.5), 1.0)
    with pytest.raises(ValueError, match="state is a null pointer"):
        C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(), ema)
    with pytest.raises(ValueError, match="ema_beta must be in"):
        C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(),
                   ema[:-1] + (1.0,), state=out.data_ptr())
    # the compute entry points re-check rows they were not promised were validated
    bad, _ = _raw([[ptr, 64, 9, 0]], [[64, 0, 1]])
    with pytest.raises(ValueError, match="table row 0"):
        C.cp_stats(bad.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(), pen)
    if not C.build_info()["cuda"]:
        for call in (lambda: C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(), pen,
                                        device=0, counter=out.data_ptr()),
                     lambda: C.cp_validate(t.data_ptr(), 1, g.data_ptr(), 1, 0)):
            with pytest.raises(RuntimeError, match="without CUDA"):
                call()
    elif C.build_info()["cuda_devices"] == 0:  # CUDA build, no GPU: fails before any launch
        with pytest.raises(RuntimeError):
            C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(), pen, device=0,
                       counter=out.data_ptr())
    if C.build_info()["cuda"]:  # the CUDA entry's own argument, checked before any CUDA call
        with pytest.raises(ValueError, match="counter is a null pointer"):
            C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, part.data_ptr(), out.data_ptr(), pen, device=0)


# ------------------------------------------------------------------ torch.library / torch.compile
def _op_args(p: PenaltyParams = P):
    grads = make_grads([100, 70000, 33], [0, 1, 2], ["float32", "float32", "float16"], scales=[5.0, 1.0, 1.0])
    return grads, [0, 1, 2], 3, list(native.pack_penalty(p, 1.0)), torch.empty(0, dtype=torch.float64)


@pytest.mark.parametrize("name", ["cp_stats", "cp_step_"])
@pytest.mark.parametrize("penalty", PENALTIES)
def test_opcheck_stats_ops(name, penalty):
    args = _op_args(with_penalty(penalty))
    torch.library.opcheck(getattr(torch.ops.cpsl, name).default, args)
    # w as a control block (core.penalty_control), read by the kernel: the optional trailing ctl
    torch.library.opcheck(getattr(torch.ops.cpsl, name).default, args + (penalty_control(0.5),))


def test_opcheck_scale_op():
    args = _op_args()
    stats = torch.ops.cpsl.cp_stats(*args)
    torch.library.opcheck(torch.ops.cpsl.cp_scale_.default, (args[0], args[1], stats, 3))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_ops_match_eager_functions(penalty):
    p = with_penalty(penalty)
    args = _op_args(p)
    grads = args[0]
    assert torch.equal(torch.ops.cpsl.cp_stats(*args), native.cp_stats(grads, [0, 1, 2], 3, p, 1.0))
    assert CPStats.unpack(torch.ops.cpsl.cp_stats(*args), 3).conflict.sum() >= 1


def test_torch_compile_fullgraph_cp_step():
    gi = [0, 1, 1, 2]

    ctl = penalty_control(1.0)

    def cp_step(grads):
        stats = native.cp_stats(grads, gi, 3, P, ctl)  # the control block goes through the op as a tensor
        native.cp_scale_(grads, gi, stats, 3)
        return stats

    grads = make_grads([100, 5, 70000, 33], gi, present=[True, False, True, True], scales=[5.0, 1.0, 1.0], seed=11)
    eager, comp = clone(grads), clone(grads)
    compiled = torch.compile(cp_step, fullgraph=True)
    s_eager = cp_step(eager)
    s_comp = compiled(comp)
    assert torch.equal(s_eager, s_comp)
    assert CPStats.unpack(s_comp, 3).conflict.sum() == 1
    for a, b in zip(eager, comp):
        assert (a is None and b is None) or torch.equal(a, b)
    assert_matches(s_comp, reference_stats(grads, gi, 3, P, 1.0), 3)


def test_torch_compile_fullgraph_ema_state_and_ratio():
    """The signal state is a mutated op argument: under torch.compile it is updated in place
    exactly as in eager mode (here with the ratio rule)."""
    gi = [0, 1, 2]
    p = PenaltyParams(ema=True, ema_beta=0.5, penalty="ratio", tau=1.1)

    def cp_step(grads, state):
        return native.cp_step_(grads, gi, 3, p, 1.0, state=state)

    grads = make_grads([100, 70000, 33], gi, scales=[5.0, 1.0, 1.0], seed=12)
    eager, comp = clone(grads), clone(grads)
    s_eager, s_comp = signal_state(3), signal_state(3)
    compiled = torch.compile(cp_step, fullgraph=True)
    for _ in range(2):
        a, b = cp_step(eager, s_eager), compiled(comp, s_comp)
        assert torch.equal(a, b) and torch.equal(s_eager, s_comp)
        assert all(torch.equal(x, y) for x, y in zip(eager, comp))
    assert s_comp[3:].tolist() == [2.0, 2.0, 2.0] and CPStats.unpack(b, 3).conflict[0] == 1
