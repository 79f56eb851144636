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

from cpsl.cp import native
from cpsl.cp.core import CPStats, PenaltyParams
from cpsl.cp.reference import reference_stats
from cpsl.cp.testing import assert_matches, clone, expected_scaled, make_grads, stats_with_k

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


def test_cuda_parity_and_scale():
    grads, gi = _cuda_layout()
    ref = reference_stats(grads, gi, 3, P, 1.0)
    nat = native.cp_stats(grads, gi, 3, P, 1.0)
    assert nat.device.type == "cuda"
    assert_matches(nat, ref, 3)
    assert float(CPStats.unpack(nat, 3).conflict.sum()) >= 1
    scaled = clone(grads)
    native.cp_scale_(scaled, gi, nat, 3)
    k = CPStats.unpack(nat, 3).k.tolist()
    for g, s, m in zip(grads, scaled, gi):
        assert torch.equal(s, expected_scaled(g, k[m]))
    stepped = clone(grads)
    assert torch.equal(native.cp_step_(stepped, gi, 3, P, 1.0), nat)
    assert all(torch.equal(a, b) for a, b in zip(stepped, scaled))


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


def _capture(grads, gi):
    native.cp_step_(grads, gi, 3, P, 1.0)  # builds the plan outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        native.cp_step_(grads, gi, 3, P, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = native.cp_step_(grads, gi, 3, P, 1.0)
    return graph, out


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
    graph, out = _capture(grads, gi)
    _replay_matches(graph, out, grads, gi)


def test_cuda_graph_replay_after_clear_cache_and_eviction():
    """The graph holds raw pointers to its plan: clear_cache() and eviction must not free it."""
    native.release_graph_plans()
    grads, gi = _cuda_layout(n_big=3_000_000, seed=1)
    graph, out = _capture(grads, gi)
    native.clear_cache()
    churn = []
    for i in range(native.MAX_PLANS + 4):  # evict everything evictable and reuse the freed memory
        t = torch.randn(50_000 + i, device="cuda")
        churn.append(t)
        native.cp_step_([t], [0], 1, P, 1.0)
    native.clear_cache()
    junk = [torch.full((1 << 16,), 7.0, device="cuda") for _ in range(16)]  # would land in freed plan memory
    _replay_matches(graph, out, grads, gi, trials=2)
    assert native.release_graph_plans() >= 1
    del graph, junk, churn


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
    fresh = [torch.randn(77, device="cuda")]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        with torch.cuda.graph(graph):
            native.cp_step_(fresh, [0], 1, P, 1.0)
