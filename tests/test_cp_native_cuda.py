"""CUDA path of the native CP backend against the float64 reference.

Needs nothing beyond pytest and torch (bench/gpu_check.sh runs this file on a bare GPU
machine). Every test is marked ``cuda`` and skipped, with the reason, where the kernels
cannot run; CPSL_REQUIRE_CUDA=1 turns the skips into failures so that a GPU check cannot
pass by skipping.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from cpsl.config import CPConfig
from cpsl.cp import native
from cpsl.cp.arena import GradArena
from cpsl.cp.core import CPStats, PenaltyParams, penalty_control, signal_state
from cpsl.cp.penalty import ConflictAwarePenalty
from cpsl.cp.reference import reference_stats
from cpsl.cp.testing import assert_matches, clone, expected_scaled, make_grads, stats_with_k
from cpsl.strategies.base import bind_group_lrs

P = PenaltyParams()
_OK, _WHY = native.available("cuda")
_REQUIRE_CUDA = os.environ.get("CPSL_REQUIRE_CUDA") == "1"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _OK and not _REQUIRE_CUDA, reason=f"native CUDA kernels cannot run: {_WHY}")]


def _raw(rows, ginfo):
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), torch.tensor(ginfo, dtype=torch.int64).reshape(-1, 3)


def _cuda_layout(device="cuda", seed=0, n_big=40_000_000):
    sizes = [n_big, 1000, 65536 * 2 + 3, 5, 0, 300, 70001, 100003, 5001]
    groups = [0, 1, 1, 2, 2, 0, 2, 1, 0]
    dtypes = ["float32", "float32", "float16", "bfloat16", "float32", "float32", "bfloat16", "float32", "float16"]
    grads = make_grads(sizes, groups, dtypes, scales=[1.0, 4.0, 0.5], seed=seed, device=device)
    # views starting 4 / 2 bytes into their allocation: the kernels' alignment peel
    grads[7] = grads[7][1:]
    grads[8] = grads[8][1:]
    return grads, groups


def test_cuda_usable_here():
    assert native._load().cuda_usable(torch.cuda.current_device()) == ""
    assert native.available("cuda") == (True, "")


@pytest.mark.parametrize("penalty", ["tanh", "fixed", "ratio"])
def test_cuda_parity_and_scale(penalty):
    grads, gi = _cuda_layout()
    p = PenaltyParams(penalty=penalty)
    ref = reference_stats(grads, gi, 3, p, 1.0)
    nat = native.cp_stats(grads, gi, 3, p, 1.0)
    assert nat.device.type == "cuda"
    assert_matches(nat, ref, 3)
    assert float(CPStats.unpack(nat, 3).conflict.sum()) >= 1
    scaled = clone(grads)
    native.cp_scale_(scaled, gi, nat, 3)
    k = CPStats.unpack(nat, 3).k.tolist()
    for g, s, m in zip(grads, scaled, gi):
        assert torch.equal(s, expected_scaled(g, k[m]))
    # the fused step on the SAME gradient memory: bit-identical statistics are promised for one
    # memory layout only (grads[7] and grads[8] start off a 16-byte boundary; clones of them are
    # aligned, so the kernel's alignment peel would split them elsewhere and round differently)
    assert torch.equal(native.cp_step_(grads, gi, 3, p, 1.0), nat)
    assert all(torch.equal(a, b) for a, b in zip(grads, scaled))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_alignment_peel(dtype):
    """Every start offset within 16 bytes, lengths around the vector width: stats match the
    reference and the scale pass is exact, including the peeled head and the tail."""
    base = make_grads([200_000], [0], [dtype], seed=5, device="cuda")[0]
    for off in range(8):
        for n in (1, 3, 7, 8, 9, 4099, 70001):
            x = base[off:off + n]
            y = torch.randn(1000, device="cuda").to(dtype)
            ref = reference_stats([x, y], [0, 1], 2, P, 1.0)
            assert_matches(native.cp_stats([x, y], [0, 1], 2, P, 1.0), ref, 2)
            got = x.clone()
            native.cp_scale_([got], [0], stats_with_k([0.3]).cuda(), 1)
            assert torch.equal(got, expected_scaled(x, 0.3))
    native.clear_cache()


def test_cuda_many_tensors_guard_and_determinism():
    n = 1500
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 3000, (n,), generator=gen).tolist()
    groups = torch.randint(0, 4, (n,), generator=gen).tolist()
    grads = make_grads(sizes, groups, scales=[5.0, 1.0, 1.0, 0.2], seed=4, device="cuda")
    ref = reference_stats(grads, groups, 4, P, 1.0)
    a = native.cp_stats(grads, groups, 4, P, 1.0)
    b = native.cp_stats(grads, groups, 4, P, 1.0)
    assert torch.equal(a, b)
    assert_matches(a, ref, 4)
    big, gi = _cuda_layout(seed=2)
    runs = [native.cp_stats(big, gi, 3, P, 1.0) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    big[1][7] = math.nan
    s = native.cp_stats(big, gi, 3, P, 1.0)
    assert_matches(s, reference_stats(big, gi, 3, P, 1.0), 3)
    assert float(s[-1]) == 1.0
    big[1][7] = 1.0
    big[7][3] = 2e19  # fp32 square overflows, peeled head or not: the guard trips
    assert float(native.cp_stats(big, gi, 3, P, 1.0)[-1]) == 1.0


def test_cuda_every_16bit_pattern():
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).cuda()
        got = x.clone()
        native.cp_scale_([got], [0], stats_with_k([1.0 / 3.0]).cuda(), 1)
        exp = expected_scaled(x, 1.0 / 3.0)
        nan = exp.float().isnan()
        assert torch.equal(got.float().isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), exp[~nan].view(torch.int16))


def _capture(fn):
    """``fn()`` once on a side stream (torch's warm-up; the plans must exist before a capture),
    then captured into a new graph. Returns (graph, fn's result, the capture's handle)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
        handle = native.capture_handle()
    return graph, out, handle


def _capture_step(grads, gi):
    native.cp_step_(grads, gi, 3, P, 1.0)  # builds the plan outside the capture
    return _capture(lambda: native.cp_step_(grads, gi, 3, P, 1.0))


def _replay_matches(graph, out, grads, gi, trials=4):
    for trial, scales in enumerate(([1.0, 4.0, 0.5], [3.0, 0.1, 1.0], [1.0, 1.0, 1.0], [0.2, 0.2, 9.0])[:trials]):
        fresh = make_grads([g.numel() for g in grads], gi, [g.dtype for g in grads], scales=scales, seed=100 + trial,
                           device="cuda")
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, reference_stats(fresh, gi, 3, P, 1.0), 3)  # counter was reset by the last block
        k = CPStats.unpack(out, 3).k.tolist()
        for g, f, m in zip(grads, fresh, gi):
            assert torch.equal(g, expected_scaled(f, k[m]))


def test_cuda_graph_capture_and_replay():
    grads, gi = _cuda_layout(n_big=5_000_000)
    graph, out, handle = _capture_step(grads, gi)
    assert handle in native.graph_handles() and handle.device == torch.cuda.current_device()
    _replay_matches(graph, out, grads, gi)
    del graph
    assert native.release_graph_plans(handle) == 1 and handle not in native.graph_handles()


def test_cuda_graph_replay_after_clear_cache_and_eviction():
    """The graph holds raw pointers to its plan: clear_cache() and eviction must not free it."""
    grads, gi = _cuda_layout(n_big=3_000_000, seed=1)
    graph, out, handle = _capture_step(grads, gi)
    native.clear_cache()
    churn = []
    for i in range(native.MAX_PLANS + 4):  # evict everything evictable and reuse the freed memory
        t = torch.randn(50_000 + i, device="cuda")
        churn.append(t)
        native.cp_step_([t], [0], 1, P, 1.0)
    native.clear_cache()
    junk = [torch.full((1 << 16,), 7.0, device="cuda") for _ in range(16)]  # would land in freed plan memory
    _replay_matches(graph, out, grads, gi, trials=2)
    del graph, junk, churn
    assert native.release_graph_plans(handle) == 1


def test_cuda_side_stream_and_channels_last():
    x = torch.randn(8, 16, 5, 5, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randn(3000, device="cuda") * 5
    ref = reference_stats([x, y], [0, 1], 2, P, 1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s = native.cp_step_([x, y], [0, 1], 2, P, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    native.clear_cache()  # the plan's tensors were recorded on `side`: freeing them here is safe
    torch.cuda.synchronize()
    assert_matches(s, ref, 2)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_cuda_aliased_gradients_rejected():
    g = torch.randn(5000, device="cuda")
    ref = reference_stats([g, g], [0, 1], 2, P, 1.0)
    assert_matches(native.cp_stats([g, g], [0, 1], 2, P, 1.0), ref, 2)  # counted once per occurrence
    with pytest.raises(ValueError, match="overlap in memory"):
        native.cp_step_([g, g[10:20]], [0, 1], 2, P, 1.0)


def test_cuda_training_builds_one_plan():
    from cpsl.cp.arena import GradArena
    from cpsl.cp.penalty import ConflictAwarePenalty
    from cpsl.config import CPConfig

    torch.manual_seed(0)
    nets = {m: torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 1)).cuda() for m in "tav"}
    params = [p for n in nets.values() for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    cp = ConflictAwarePenalty({m: list(n.parameters()) for m, n in nets.items()},
                              CPConfig(backend="native", mode="grad"))
    arena = GradArena.for_modulator(cp, opt)
    before = native.plan_builds("cuda")
    for step in range(5):
        arena.zero_grad()
        x = torch.randn(8, 33, device="cuda")
        loss = sum((n(x) * (i + 1)).square().mean() for i, n in enumerate(nets.values()))
        loss.backward()
        cp.step(5)
        opt.step()
        opt.zero_grad(set_to_none=True)  # a stray set_to_none: the arena re-attaches its views
    assert native.plan_builds("cuda") - before == 1


def test_cuda_argument_errors():
    with pytest.raises(ValueError, match=r"grads\[1\] is on cpu but grads\[0\] is on cuda"):
        native.cp_stats([torch.randn(3, device="cuda"), torch.randn(3)], [0, 0], 1, P, 1.0)
    stats = native.cp_stats([torch.randn(3, device="cuda")], [0], 1, P, 1.0)
    with pytest.raises(ValueError, match="stats is on cpu"):
        native.cp_scale_([torch.randn(3, device="cuda")], [0], stats.cpu(), 1)
    C = native._load()
    x = torch.randn(64, device="cuda")
    t, g = _raw([[x.data_ptr(), 64, 0, 0]], [[64, 0, 1]])
    with pytest.raises(ValueError, match="CUDA device .* but the CPU path"):
        C.cp_validate(t.data_ptr(), 1, g.data_ptr(), 1, -1, True)
    h = torch.randn(64)
    t, g = _raw([[h.data_ptr(), 64, 0, 0]], [[64, 0, 1]])
    with pytest.raises(ValueError, match="not memory of CUDA device 0"):
        C.cp_validate(t.data_ptr(), 1, g.data_ptr(), 1, 0, True)
    out = torch.empty(6, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="counter is a null pointer"):  # the CUDA entry's own argument
        C.cp_stats(t.data_ptr(), 1, g.data_ptr(), 1, out.data_ptr(), out.data_ptr(), native.pack_penalty(P, 1.0),
                   device=0)
    with pytest.raises(RuntimeError, match="no CUDA graph capture is under way on cuda:0"):
        native.capture_handle(0)
    fresh = [torch.randn(77, device="cuda")]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        with torch.cuda.graph(graph):
            native.cp_step_(fresh, [0], 1, P, 1.0)


# ------------------------------------------------------------------ the EMA signal (cp.signal=ema)
EMA_SIZES, EMA_GROUPS = [70001, 1000, 40000, 300, 5000], [0, 1, 1, 2, 2]
EMA_SCALES = ([3.0, 1.0, 0.4], [0.5, 2.5, 1.0], [1.0, 1.0, 4.0], [2.0, 0.3, 0.3], [0.2, 1.0, 3.0])


def _ema_data(absent: bool, guard_at: int):
    """Five steps of gradients on the GPU: group 2 absent (None) on odd steps when ``absent``;
    an inf entry in group 1 at step ``guard_at`` (a guarded step)."""
    steps = []
    for t, scales in enumerate(EMA_SCALES):
        present = [True, True, True, not absent or t % 2 == 0, not absent or t % 2 == 0]
        grads = make_grads(EMA_SIZES, EMA_GROUPS, present=present, scales=scales, seed=300 + t, device="cuda")
        if t == guard_at:
            grads[1][5] = math.inf
        steps.append(grads)
    return steps


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_cuda_ema_state_matches_reference_over_steps(beta):
    """The EMA stage of the kernel: state and r̃ follow the reference step by step; the guarded
    step leaves the state bit-identical; an absent group keeps its state and gets r̃ = 0."""
    p = PenaltyParams(ema=True, ema_beta=beta, tau=1.1)
    ref_state, state = signal_state(3, "cuda"), signal_state(3, "cuda")
    for t, grads in enumerate(_ema_data(absent=True, guard_at=2)):
        before = state.clone()
        ref = reference_stats(grads, EMA_GROUPS, 3, p, 1.0, ref_state)
        nat = native.cp_stats(grads, EMA_GROUPS, 3, p, 1.0, state=state)
        assert_matches(nat, ref, 3, rtol=1e-5, katol=1e-5)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=0.0)
        if t == 2:
            assert float(nat[-1]) == 1.0 and torch.equal(state, before)
        if t % 2 == 1:  # group 2 absent: its e and t untouched, r̃ = 0
            assert state[2] == before[2] and state[5] == before[5] and float(CPStats.unpack(nat, 3).r[2]) == 0.0
    assert ref_state[3:].tolist() == [4.0, 4.0, 2.0]  # steps counted: the guarded one skipped, group 2 on 0 and 4


def test_cuda_ema_under_graph_capture_and_replay():
    """The fused step with the EMA stage captured once and replayed over five steps (one
    guarded): the state evolves on the device exactly as the reference's, the grads are scaled."""
    p = PenaltyParams(ema=True, ema_beta=0.9, tau=1.1)
    data = _ema_data(absent=False, guard_at=2)
    grads = [torch.zeros_like(g) for g in data[0]]
    state, ref_state = signal_state(3, "cuda"), signal_state(3, "cuda")
    native.cp_step_(grads, EMA_GROUPS, 3, p, 1.0, state=state)  # the plan, outside the capture
    graph, out, handle = _capture(lambda: native.cp_step_(grads, EMA_GROUPS, 3, p, 1.0, state=state))
    state.zero_()  # the warm-up steps advanced it; replays start from a fresh state
    for t, d in enumerate(data):
        for g, x in zip(grads, d):
            g.copy_(x)
        graph.replay()
        ref = reference_stats(d, EMA_GROUPS, 3, p, 1.0, ref_state)
        assert_matches(out, ref, 3, rtol=1e-5, katol=1e-5)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=0.0)
        k = CPStats.unpack(out, 3).k.tolist()
        assert all(torch.equal(g, expected_scaled(x, k[m])) for g, x, m in zip(grads, d, EMA_GROUPS))
    assert ref_state[3:].tolist() == [4.0, 4.0, 4.0]
    del graph
    assert native.release_graph_plans(handle) == 1


# ------------------------------------------------------------------ ConflictAwarePenalty on CUDA
def _cp_on_cuda(mode: str):
    """Three small nets as the CP groups (grads in a GradArena), fused AdamW with one tensor-lr
    param group per modality, a 4-epoch ramp (w = 1/4, 1/2, 3/4, 1)."""
    torch.manual_seed(0)
    nets = {m: torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 1)).cuda() for m in "tav"}
    opt = torch.optim.AdamW([{"params": list(n.parameters()), "lr": torch.tensor(1e-3, device="cuda")}
                             for n in nets.values()], fused=True)
    cfg = CPConfig(backend="native", mode=mode, tau=0.9, start_epoch=0, ramp_epochs=4)
    groups = {m: list(n.parameters()) for m, n in nets.items()}
    cp = ConflictAwarePenalty(groups, cfg, lr_slots=bind_group_lrs(opt, groups) if mode == "update" else None)
    assert cp.backend_name == "native"
    arena = GradArena.for_modulator(cp, opt)
    return cp, opt, arena


def _fill_grads(cp, seed: int) -> list[torch.Tensor]:
    """Random gradients (group 't' 6x larger: it conflicts) written into the arena; returns copies."""
    gen = torch.Generator().manual_seed(seed)
    scales = (6.0, 1.0, 0.5)
    for p, gi in zip(cp.params, cp.group_index):
        p.grad.copy_(torch.randn(p.shape, generator=gen) * scales[gi])
    return [p.grad.clone() for p in cp.params]


def _check_step(cp, opt, mode: str, fresh, k: torch.Tensor, w: float, base_lr: float = 1e-3) -> None:
    """k (on the device) is the reference's at weight w, and was applied as ``mode`` says."""
    ref = CPStats.unpack(reference_stats(fresh, cp.group_index, 3, cp.p, w), 3).k
    torch.testing.assert_close(k.cpu(), ref.cpu(), rtol=0.0, atol=1e-6)
    kl = k.tolist()
    for p, f, gi in zip(cp.params, fresh, cp.group_index):
        assert torch.equal(p.grad, expected_scaled(f, kl[gi]) if mode == "grad" else f)
    if mode == "update":
        for gi, pg in enumerate(opt.param_groups):
            assert float(pg["lr"]) == pytest.approx(base_lr * kl[gi], rel=1e-6)


def test_cuda_update_mode_scales_the_group_learning_rates():
    cp, opt, arena = _cp_on_cuda("update")
    fresh = _fill_grads(cp, seed=1)
    rec = cp.step(3)  # end of the ramp: w = 1
    st = rec.stats
    assert rec.w == 1.0 and float(st.k[0]) < 1.0 and float(st.k[1]) == 1.0
    _check_step(cp, opt, "update", fresh, st.k, 1.0)
    before = [p.detach().clone() for p in cp.params]
    opt.step()  # fused AdamW reads the scaled tensor lrs on the device
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(cp.params, before))
    arena.unbind()


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_cuda_graph_replay_follows_schedule_and_stop(mode):
    """cp.step captured at epoch 0 (w = 1/4) and replayed after cp.set_epoch moves the ramp and
    after the stop rule switches CP off: every replay applies the weight written between
    replays (a graph whose kernel took w by value would repeat w = 1/4)."""
    cp, opt, arena = _cp_on_cuda(mode)
    _fill_grads(cp, seed=2)
    cp.step(0)  # builds the plan and writes w(0) into the control block, outside the capture
    graph, st, handle = _capture(lambda: cp.step(0).stats)
    for trial, (epoch, stop, w) in enumerate(((0, False, 0.25), (1, False, 0.5), (3, False, 1.0),
                                              (3, True, 0.0), (9, True, 0.0))):
        cp.set_epoch(epoch)
        cp.stopped = stop
        assert cp.weight == w
        fresh = _fill_grads(cp, seed=10 + trial)
        graph.replay()
        _check_step(cp, opt, mode, fresh, st.k, w)
        if w == 0.0:
            assert float(st.k.min()) == 1.0 and float(st.conflict.sum()) >= 1  # stopped: statistics only
        else:
            assert float(st.k[0]) < 1.0
    del graph
    assert native.release_graph_plans(handle) == 1
    with pytest.raises(RuntimeError, match="during a CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            cp.step(0)  # the weight (0 while stopped... now epoch 0 of an un-stopped run) cannot change inside
    arena.unbind()


# ------------------------------------------------------------------ a second device
@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"needs two CUDA devices ({torch.cuda.device_count()} visible)")
def test_cuda_second_device_while_device_0_is_current():
    """Gradients on cuda:1 with cuda:0 current: the launch, the control block's device check,
    a graph captured on cuda:1, and the capture check asking cuda:1's stream (not the current
    device's, which is not capturing)."""
    dev = torch.device("cuda", 1)
    assert native.available(dev) == (True, "")
    torch.cuda.set_device(0)
    grads, gi = _cuda_layout(device=dev, n_big=1_000_000, seed=6)
    ctl = penalty_control(1.0, True, dev)
    s = native.cp_stats(grads, gi, 3, P, ctl)
    assert s.device == dev
    assert_matches(s, reference_stats(grads, gi, 3, P, 1.0), 3)
    with pytest.raises(ValueError, match="control block is on cuda:0"):
        native.cp_stats(grads, gi, 3, P, penalty_control(1.0, True, "cuda:0"))
    with torch.cuda.device(dev):
        graph, out, handle = _capture(lambda: native.cp_step_(grads, gi, 3, P, ctl))
        assert handle.device == 1
        ctl[0].fill_(0.5)
        fresh = make_grads([g.numel() for g in grads], gi, [g.dtype for g in grads], scales=[1.0, 4.0, 0.5],
                           seed=7, device=dev)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        torch.cuda.synchronize(dev)
        assert_matches(out, reference_stats(fresh, gi, 3, P, 0.5), 3)
        del graph
        assert native.release_graph_plans(handle) == 1
        new = [torch.randn(77, device=dev)]
        with pytest.raises(RuntimeError, match="during CUDA graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                with torch.cuda.device(0):  # current device 0, not capturing; cuda:1's stream is
                    native.cp_step_(new, [0], 1, P, 1.0)
    assert torch.cuda.current_device() == 0
