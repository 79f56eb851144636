"""Native CP plans on CPU: LRU cache, graph-pinned plans, aliasing, dense layouts, the
gradient arena (one plan per training run) and honest CUDA availability."""
from __future__ import annotations

import warnings

import pytest
import torch

from cpsl.config import CPConfig
from cpsl.cp import native, plans
from cpsl.cp.arena import ALIGN_BYTES, GradArena
from cpsl.cp.core import CPStats, PenaltyParams, get_backend
from cpsl.cp.penalty import ConflictAwarePenalty, resolve_backend
from cpsl.cp.reference import reference_stats
from cpsl.cp.testing import assert_matches, clone, expected_scaled, make_grads, stats_with_k

_OK, _WHY = native.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"native CP kernels unavailable: {_WHY}")
P = PenaltyParams()


def _plan(n):
    g = [torch.randn(10 + n)]
    return g, native._plan_for(g, [0], 1)


# ------------------------------------------------------------------ cache policy
def test_cache_is_lru():
    native.clear_cache()
    held = [_plan(i) for i in range(native.MAX_PLANS)]
    first_grads, first = held[0]
    assert native._plan_for(first_grads, [0], 1) is first  # a hit: now the most recent
    held.append(_plan(100))  # one more: evicts the least recently used, which is held[1]
    assert len(native._plans) == native.MAX_PLANS
    assert native._plan_for(first_grads, [0], 1) is first
    before = native.plan_builds()
    native._plan_for(held[1][0], [0], 1)
    assert native.plan_builds() == before + 1  # held[1] was evicted and is rebuilt


def test_graph_pinned_plans_survive_clear_cache_and_eviction():
    """A plan a CUDA graph captured (pinned by Plan.on_stream under the capture's handle;
    pinned by hand here, the capture itself is tested in test_cp_native_cuda.py) keeps its buffers."""
    native.clear_cache()
    grads, plan = _plan(0)
    h = native.GraphHandle(0, 101)
    plans.pin(plan, h)
    ptrs = (plan.table.data_ptr(), plan.partials.data_ptr())
    native.clear_cache()
    for i in range(native.MAX_PLANS + 2):
        _plan(i + 1)
    assert native._plan_for(grads, [0], 1) is plan
    assert (plan.table.data_ptr(), plan.partials.data_ptr()) == ptrs
    assert native.release_graph_plans(h) == 1 and not plan.pinned
    assert native.plan_builds(torch.device("cpu")) + native.plan_builds("cuda") == native.plan_builds()
    native._builds["cuda:1"] = native._builds.get("cuda:1", 0) + 2  # what two builds on a second GPU record
    try:
        assert native.plan_builds("cuda") - native.plan_builds("cuda:0") == native.plan_builds("cuda:1") >= 2
    finally:
        native._builds["cuda:1"] -= 2
    before = native.plan_builds()
    assert native._plan_for(grads, [0], 1) is not plan
    assert native.plan_builds() == before + 1


def test_release_graph_plans_frees_one_capture_only():
    """Two graphs: releasing one unpins its plans but keeps a plan the other still replays."""
    native.clear_cache()
    (ga, a), (gb, b) = _plan(200), _plan(201)
    h1, h2 = native.GraphHandle(0, 7), native.GraphHandle(0, 8)
    plans.pin(a, h1)
    plans.pin(b, h1)
    plans.pin(a, h2)  # graph 2 uses a too
    native.clear_cache()
    assert native.graph_handles() == [h1, h2]
    assert native.release_graph_plans(h1) == 2
    assert a.pinned and not b.pinned and native.graph_handles() == [h2]
    assert native._plan_for(ga, [0], 1) is a  # still served from the pins: graph 2 holds its pointers
    assert native._plan_for(gb, [0], 1) is not b  # graph 1's own plan was let go
    assert native.release_graph_plans(h1) == 0  # releasing twice is harmless
    assert native.release_graph_plans(h2) == 1 and not a.pinned and native.graph_handles() == []
    with pytest.raises(TypeError, match="GraphHandle"):
        native.release_graph_plans(None)
    with pytest.raises(RuntimeError, match="no CUDA device|no CUDA graph capture is under way"):
        native.capture_handle()  # outside a capture (CPU here; the CUDA test checks it on a GPU)


# ------------------------------------------------------------------ schedule on replay
def _replayable_cp(ramp_epochs=4):
    torch.manual_seed(3)
    groups = {"t": [torch.nn.Parameter(torch.randn(50, 8))], "a": [torch.nn.Parameter(torch.randn(300))],
              "v": [torch.nn.Parameter(torch.randn(7, 7))]}
    for (name, ps), s in zip(groups.items(), (6.0, 1.0, 0.5)):
        for p in ps:
            p.grad = torch.randn(p.shape) * s
    cfg = CPConfig(backend="native", mode="grad", tau=0.9, start_epoch=0, ramp_epochs=ramp_epochs)
    return ConflictAwarePenalty(groups, cfg)


def test_replayed_launch_follows_the_schedule_written_between_replays(monkeypatch):
    """What a CUDA graph replay does, on CPU: cp.compute's stats launch is recorded and issued
    again with the SAME arguments after set_epoch moves the ramp and after the stop rule
    switches the penalty off. The kernel reads w from the control block when it runs, so the
    re-issued launch follows both; a w passed by value (the bug: a graph kept its capture-time
    weight) would repeat epoch 0's k."""
    C = native._load()
    launches = []
    real = C.cp_stats

    def record(*args, **kw):
        launches.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(C, "cp_stats", record)
    cp = _replayable_cp()
    grads = [p.grad for p in cp.params]
    stats, w = cp.compute(0)  # the "capture": epoch 0 of a 4-epoch ramp, w = 1/4
    assert w == 0.25 and len(launches) == 1
    assert_matches(stats, reference_stats(grads, cp.group_index, 3, cp.p, 0.25), 3)
    assert float(CPStats.unpack(stats, 3).k.min()) < 1.0
    args, kw = launches[0]
    for epoch, want in ((2, 0.75), (3, 1.0), (9, 1.0)):
        assert cp.set_epoch(epoch) == want
        real(*args, **kw)  # the "replay": same pointers, same by-value arguments
        assert_matches(stats, reference_stats(grads, cp.group_index, 3, cp.p, want), 3)
    cp.stopped = True  # the plateau rule switches CP off between replays
    real(*args, **kw)
    assert torch.equal(CPStats.unpack(stats, 3).k, torch.ones(3, dtype=torch.float64))
    assert float(CPStats.unpack(stats, 3).conflict.sum()) >= 1  # statistics still computed
    assert cp.weight == 0.0 and cp.control.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("backend", ["reference", "foreach", "native"])
def test_control_block_equals_the_float_weight(backend):
    """Every backend computes the same function with w as a float or as a control block."""
    from cpsl.cp.core import penalty_control
    grads = make_grads([400, 3000, 50], [0, 1, 2], scales=[8.0, 1.0, 0.3], seed=11)
    be = get_backend(backend)
    for w, on in ((0.4, True), (1.0, True), (0.7, False)):
        by_value = be.compute(grads, [0, 1, 2], 3, P, w if on else 0.0)
        assert torch.equal(be.compute(grads, [0, 1, 2], 3, P, penalty_control(w, on)), by_value)
    with pytest.raises(ValueError, match="control block"):
        be.compute(grads, [0, 1, 2], 3, P, torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------ aliasing
def test_aliased_gradients_stats_exact_scale_rejected():
    g = torch.randn(5000) * 3
    h = torch.randn(300)
    grads, gi = [g, h, g], [0, 1, 2]
    ref = reference_stats(grads, gi, 3, P, 1.0)
    assert_matches(native.cp_stats(grads, gi, 3, P, 1.0), ref, 3)  # each occurrence counts, as in the reference
    stats = native.cp_stats(grads, gi, 3, P, 1.0)
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[2\] overlap in memory"):
        native.cp_scale_(grads, gi, stats, 3)
    with pytest.raises(ValueError, match="overlap in memory"):
        native.cp_step_([g[:100], g[50:200]], [0, 1], 2, P, 1.0)  # partial overlap too


def _shared_embedding_setup():
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(40, 8))
    a, b = torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(20))
    groups = {"text": [shared, a], "audio": [shared, b]}
    return shared, a, b, groups


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_shared_parameter_in_two_groups(backend):
    shared, a, b, groups = _shared_embedding_setup()
    cfg = CPConfig(backend=backend, mode="grad", tau=0.5)
    if backend == "native":
        with pytest.raises(ValueError, match="cannot scale aliased gradients"):
            ConflictAwarePenalty(groups, cfg)
        return
    with pytest.warns(UserWarning, match="in CP groups 'text' and 'audio'"):
        cp = ConflictAwarePenalty(groups, cfg)
    assert cp.backend_name == "foreach"
    for p, s in ((shared, 1.0), (a, 20.0), (b, 0.1)):
        p.grad = torch.randn(p.shape) * s
    before = [p.grad.clone() for p in cp.params]
    ref = reference_stats(before, cp.group_index, 2, cp.p, 1.0)
    st = cp.step(0).stats
    k = CPStats.unpack(ref, 2).k.tolist()
    assert min(k) < 1.0
    torch.testing.assert_close(st.k, CPStats.unpack(ref, 2).k)
    # the reference applies both groups' factors to the shared tensor: k_text * k_audio
    torch.testing.assert_close(shared.grad, before[0] * k[0] * k[1])


# ------------------------------------------------------------------ layouts
def test_dense_noncontiguous_gradients():
    x = torch.randn(4, 6, 3, 3).to(memory_format=torch.channels_last) * 4
    t = torch.randn(50, 7).t()
    y = torch.randn(1000)
    grads, gi = [x, t, y], [0, 1, 1]
    ref = reference_stats(grads, gi, 2, P, 1.0)
    s = native.cp_stats(grads, gi, 2, P, 1.0)
    assert_matches(s, ref, 2)
    k = CPStats.unpack(s, 2).k.tolist()
    assert k[0] < 1.0
    out = clone(grads)
    native.cp_scale_(out, gi, s, 2)
    for g, o, m in zip(grads, out, gi):
        assert o.stride() == g.stride() and torch.equal(o, expected_scaled(g, k[m]))


@pytest.mark.parametrize("where", [0, 5, 63, 64, 511, 512, 70000 - 1])
def test_guard_threshold_does_not_depend_on_position(where):
    """Squares are fp32 on every path: 2e19 (square 4e38 > FLT_MAX) trips the guard wherever it sits."""
    base = torch.randn(70001)
    for off in (0, 1):
        g = base[off:].clone() if off == 0 else base[off:]
        g[where] = 2e19
        assert float(native.cp_stats([g, torch.randn(10)], [0, 1], 2, P, 1.0)[-1]) == 1.0
        g[where] = 1e19  # square 1e38 < FLT_MAX: finite
        assert float(native.cp_stats([g, torch.randn(10)], [0, 1], 2, P, 1.0)[-1]) == 0.0


# ------------------------------------------------------------------ arena
def _model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({m: torch.nn.Sequential(torch.nn.Linear(13, 12), torch.nn.ReLU(),
                                                       torch.nn.Linear(12, 1)) for m in ("t", "a", "v")})


def test_arena_views_aligned_stable_and_merged():
    net = _model()
    groups = {m: list(net[m].parameters()) for m in net}
    arena = GradArena(groups)
    ptrs = [p.grad.data_ptr() for p in arena.params]
    assert all(pt % ALIGN_BYTES == 0 for pt in ptrs)
    assert all(p.grad._base is not None for p in arena.params)
    x = torch.randn(5, 13)
    for _ in range(3):
        arena.zero_grad()
        sum(net[m](x * (i + 1)).sum() for i, m in enumerate(net)).backward()
        assert [p.grad.data_ptr() for p in arena.params] == ptrs  # backward accumulated in place
    for p in arena.params:
        p.grad = None  # e.g. optimizer.zero_grad(set_to_none=True)
    arena.zero_grad()
    assert arena.attached() and [p.grad.data_ptr() for p in arena.params] == ptrs
    assert all(float(b.abs().sum()) == 0.0 for b in arena.buffers)
    # back-to-back views of one group merge into one run: w1 (156), b1 (12) and w2 (12) need
    # no padding, so [w1 b1 w2 b2] is contiguous -> one chunk row per group instead of four
    g = [p.grad for p in arena.params]
    gi = [i // 4 for i in range(len(g))]
    assert native._plan_for(g, gi, 3).n_chunks == 3
    assert native._plan_for(clone(g), gi, 3).n_chunks == 12
    ref = reference_stats(g, gi, 3, P, 1.0)
    assert_matches(native.cp_stats(g, gi, 3, P, 1.0), ref, 3)


def test_arena_training_matches_set_to_none_and_builds_one_plan():
    """Same losses with and without the arena (backward writes 0 + g = g), and ONE plan."""
    losses = {}
    for use_arena in (False, True):
        net = _model()
        params = list(net.parameters())
        opt = torch.optim.AdamW(params, lr=1e-2)
        cp = ConflictAwarePenalty({m: list(net[m].parameters()) for m in net}, CPConfig(backend="native", mode="grad",
                                                                                      tau=0.9))
        arena = GradArena.for_modulator(cp, opt) if use_arena else None
        gen = torch.Generator().manual_seed(1)
        before = native.plan_builds("cpu")
        out = []
        for _ in range(6):
            opt.zero_grad(set_to_none=True)  # bound to the arena's zero_grad when it is installed
            x = torch.randn(16, 13, generator=gen)
            loss = sum((net[m](x) * (i + 1)).square().mean() for i, m in enumerate(net))
            loss.backward()
            cp.step(0)
            opt.step()
            out.append(float(loss.detach()))
        losses[use_arena] = out
        if use_arena:
            assert native.plan_builds("cpu") - before == 1
            assert arena.attached()
            arena.unbind()
            opt.zero_grad(set_to_none=True)  # the optimizer's own method again
            assert all(p.grad is None for p in params)
    assert losses[True] == losses[False]


def test_training_run_builds_one_plan(tmp_path):
    from cpsl.config import preset
    from cpsl.data.synthetic import SynthSpec, generate
    from cpsl.train import run

    data = generate(SynthSpec(n_train=48, n_valid=16, n_test=16, d_text=12, d_audio=5, d_vision=7,
                              text_len=(3, 9), audio_len=(4, 12), vision_len=(4, 12)))
    cfg = preset("teacher")
    for k, v in {"d": 16, "heads": 2, "audio_layers": 1, "vision_layers": 1}.items():
        setattr(cfg.model, k, v)
    cfg.data.batch_size = 16
    cfg.train.epochs, cfg.train.seeds, cfg.train.progress, cfg.train.num_threads = 2, [1], False, 1
    cfg.cp.backend, cfg.cp.mode = "native", "grad"
    res = run(cfg, data, tmp_path, log=lambda *a: None)
    assert res["backend"] == "native"
    assert res["per_seed"][0]["cp_plan_builds"] == 1  # 2 epochs x 3 batches, one plan


# ------------------------------------------------------------------ availability
def test_cuda_availability_tells_why():
    ok, why = native.available("cuda")
    if ok:
        pytest.skip("a usable CUDA device is present (see test_cp_native_cuda.py)")
    assert why
    be, note = resolve_backend("auto", "cuda")
    assert be == "foreach" and note == why
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cp = ConflictAwarePenalty({"t": [torch.nn.Parameter(torch.randn(3))]}, CPConfig(mode="grad"), device="cuda")
    assert cp.backend_name == "foreach"
    msgs = [str(x.message) for x in w]
    assert len(msgs) == 1 and why in msgs[0]
    C = native._load()
    if C.build_info()["cuda"]:
        assert C.cuda_usable(0) == why and C.build_info()["cuda_archs"]


def test_native_scale_matches_scale_of_backend_base():
    grads = make_grads([300, 5000], [0, 1], scales=[9.0, 1.0])
    s = get_backend("native").compute(grads, [0, 1], 2, P, 1.0)
    a, b = clone(grads), clone(grads)
    native.cp_scale_(a, [0, 1], s, 2)
    get_backend("reference").scale_(b, [0, 1], s, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(stats_with_k([0.5])[3], torch.tensor(0.5, dtype=torch.float64))
