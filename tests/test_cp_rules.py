"""Issue 13's CP rules: the smoothed conflict signal (cp.signal=ema) on every backend, and the
plateau stop rule (cp.stop=plateau) in training, with --resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cpsl.cp import get_backend, native
from cpsl.cp.core import CPStats, PenaltyParams, penalty_scalar, signal_state
from cpsl.cp.reference import reference_stats
from cpsl.cp.testing import assert_matches, clone, make_grads

try:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - depends on the environment
    st = None

_NATIVE, _WHY = native.available()
needs_native = pytest.mark.skipif(not _NATIVE, reason=f"native CP kernels unavailable: {_WHY}")
EMA = PenaltyParams(penalty="tanh", ema=True, ema_beta=0.9)


# ------------------------------------------------------------------ the definition
def test_ema_bias_correction_by_hand():
    """r̃ after one step is r itself (bias-corrected); after two, (β(1−β) r1 + (1−β) r2) / (1 − β²)."""
    b = 0.9
    p = PenaltyParams(penalty="tanh", ema=True, ema_beta=b, tau=1.2, alpha=0.5)
    state = [0.0] * 4
    # step 1: ĝ = (3, 1) → r = (1.5, 0.5)
    out = penalty_scalar([9.0, 1.0], [1, 1], [True, True], p, 1.0, state)
    assert out[4:6] == pytest.approx([1.5, 0.5], rel=1e-15)
    assert state == pytest.approx([(1 - b) * 1.5, (1 - b) * 0.5, 1.0, 1.0], rel=1e-15)
    assert out[6] == pytest.approx(1 - math.tanh(0.5 * 0.5)) and out[8] == 1.0   # conflict on r̃ = 1.5
    # step 2: ĝ = (1, 1) → r = (1, 1): the raw r is no conflict, the smoothed one still is
    out = penalty_scalar([1.0, 1.0], [1, 1], [True, True], p, 1.0, state)
    want0 = (b * (1 - b) * 1.5 + (1 - b) * 1.0) / (1 - b ** 2)
    assert out[4] == pytest.approx(want0, rel=1e-14) and want0 > p.tau
    assert out[8] == 1.0 and out[6] == pytest.approx(1 - math.tanh(0.5 * (want0 - 1)), rel=1e-14)
    # the step rule on the same gradients: no conflict
    assert penalty_scalar([1.0, 1.0], [1, 1], [True, True], PenaltyParams(), 1.0)[8] == 0.0


def test_ema_inactive_groups_and_guarded_steps_keep_the_state():
    p = EMA
    state = [0.0] * 6
    penalty_scalar([4.0, 1.0, 1.0], [1, 1, 1], [True, True, True], p, 1.0, state)
    before = list(state)
    out = penalty_scalar([4.0, 0.0, 1.0], [1, 0, 1], [True, False, True], p, 1.0, state)   # group 1 inactive
    assert state[1] == before[1] and state[4] == before[4] == 1.0 and state[3] == 2.0 and state[5] == 2.0
    assert out[6 + 1] == 0.0 and out[9 + 1] == 1.0 and out[12 + 1] == 0.0   # r̃, k, conflict of the inactive group
    snap = list(state)
    out = penalty_scalar([float("inf"), 1.0, 1.0], [1, 1, 1], [True, True, True], p, 1.0, state)
    assert out[-1] == 1.0 and state == snap   # guarded: every k = 1 and the state untouched


def _steps(backend: str, layouts, p, w=1.0):
    be = get_backend(backend)
    state = signal_state(layouts[0][3])
    outs = []
    for grads, groups, _, G in layouts:
        outs.append(be.compute(clone(grads), groups, G, p, w, state))
    return outs, state


def _layouts(seed: int, G: int = 3, n_steps: int = 6, nonfinite_at: int = 3):
    """Steps of random gradients: group 2 absent on odd steps, one step with an inf entry."""
    gen = torch.Generator().manual_seed(seed)
    sizes, groups = [700, 70000, 300, 40, 65537], [0, 1, 1, 2, 2]
    out = []
    for t in range(n_steps):
        scales = (torch.rand(G, generator=gen) * 3 + 0.2).tolist()
        present = [True, True, True, t % 2 == 0, t % 2 == 0]
        grads = make_grads(sizes, groups, present=present, scales=scales, seed=seed * 100 + t)
        if t == nonfinite_at:
            grads[1][5] = float("inf")
        out.append((grads, groups, present, G))
    return out


@pytest.mark.parametrize("backend", ["foreach", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("penalty", ["tanh", "ratio"])
def test_ema_backends_match_the_reference_over_steps(backend, beta, penalty):
    p = PenaltyParams(ema=True, ema_beta=beta, tau=1.1, penalty=penalty)
    lay = _layouts(seed=int(beta * 10) + 1)
    ref, ref_state = _steps("reference", lay, p)
    got, got_state = _steps(backend, lay, p)
    for a, b in zip(got, ref):
        assert_matches(a, b, 3, rtol=1e-5, katol=1e-5)
    torch.testing.assert_close(got_state, ref_state, rtol=1e-5, atol=0.0)
    assert ref_state[3:].tolist() == [5.0, 5.0, 3.0]   # counts: the guarded step 3 skipped; group 2 on steps 0, 2, 4


@needs_native
def test_native_step_matches_stats_and_ema_op_passes_opcheck():
    lay = _layouts(seed=7, n_steps=3, nonfinite_at=-1)
    s1, s2 = signal_state(3), signal_state(3)
    for grads, groups, _, G in lay:
        a = native.cp_stats(grads, groups, G, EMA, 1.0, state=s1)
        b = native.cp_step_(clone(grads), groups, G, EMA, 1.0, state=s2)
        assert torch.equal(a, b)
    assert torch.equal(s1, s2)
    grads = [g for g in lay[0][0] if g is not None]
    for op in (torch.ops.cpsl.cp_stats, torch.ops.cpsl.cp_step_):  # the state is a mutated argument of both
        torch.library.opcheck(op.default, (grads, [0, 1, 1, 2, 2][:len(grads)], 3,
                                           list(native.pack_penalty(EMA, 1.0)), signal_state(3)))
    with pytest.raises(ValueError, match="needs a state"):
        native.cp_stats(grads, [0, 1, 1, 2, 2][:len(grads)], 3, EMA, 1.0)
    with pytest.raises(ValueError, match="length 2\\*n_groups"):
        native.cp_stats(grads, [0, 1, 1, 2, 2][:len(grads)], 3, EMA, 1.0, state=signal_state(2))


if st is None:
    @pytest.mark.skip(reason="hypothesis is not installed (pip install hypothesis)")
    def test_ema_parity_random():
        pass
else:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(1, 4), st.sampled_from([0.0, 0.3, 0.9, 0.99]), st.integers(0, 2**31 - 1),
           st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=6),
           st.sampled_from(["tanh", "fixed", "ratio"]))
    def test_ema_parity_random(G, beta, seed, presence, penalty):
        p = PenaltyParams(ema=True, ema_beta=beta, tau=1.3, penalty=penalty)
        groups = [i % G for i in range(4)]
        backends = ["reference", "foreach"] + (["native"] if _NATIVE else [])
        states = {b: signal_state(G) for b in backends}
        for t, present in enumerate(presence):
            scales = [0.3 + ((seed >> (3 * m + t)) & 7) for m in range(G)]
            grads = make_grads([50, 3000, 7, 70000], groups, present=present, scales=scales, seed=seed + t)
            ref = reference_stats(grads, groups, G, p, 1.0, states["reference"])
            r = CPStats.unpack(ref, G).r
            assume(bool(((r - p.tau).abs() > 1e-4).all()))
            for b in backends[1:]:
                assert_matches(get_backend(b).compute(grads, groups, G, p, 1.0, states[b]), ref, G,
                               rtol=1e-5, katol=1e-5)
        for b in backends[1:]:
            torch.testing.assert_close(states[b], states["reference"], rtol=1e-5, atol=1e-300)


# ------------------------------------------------------------------ training: resume and the stop rule
TINY = ["--set", "model.d=16", "--set", "model.heads=2", "--set", "model.audio_layers=1", "--set", "model.vision_layers=1",
        "--set", "data.batch_size=16", "--set", "train.num_threads=1", "--preset", "student", "--quiet"]


@pytest.fixture(scope="module")
def weak_av_pkl(tmp_path_factory):
    """Synthetic data whose audio and vision carry no label information (no cue, no interaction)."""
    from cpsl.data.mmsa import save_mmsa
    from cpsl.data.synthetic import SynthSpec, generate
    p = tmp_path_factory.mktemp("d") / "weak_av.pkl"
    save_mmsa(generate(SynthSpec(n_train=64, n_valid=24, n_test=24, d_text=12, d_audio=5, d_vision=7,
                                 text_len=(3, 9), audio_len=(4, 12), vision_len=(4, 12), cue_gain=0.0,
                                 interaction=0.0)), p)
    return p


def _cli(*args):
    from click.testing import CliRunner

    from cpsl.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _log(d):
    return [json.loads(x) for x in (d / "seed1" / "log.jsonl").read_text().splitlines()]


def _results(d):
    res = json.loads((d / "results.json").read_text())
    for r in res["per_seed"]:
        r.pop("ckpt"), r.pop("ms_per_step")
    res["config"]["data"].pop("path", None)
    return res


PLATEAU = ["--set", "cp.signal=ema", "--set", "cp.stop=plateau", "--set", "cp.stop_patience=1",
           "--set", "cp.stop_delta=1.0"]


def test_plateau_stop_with_ema_signal_resumes_exactly(weak_av_pkl, tmp_path):
    """cp.stop=plateau: no unpenalised modality's aux head improves by > 1.0 after epoch 0, so the
    penalty stops at the end of epoch 1 and k = 1 afterwards. Resuming after epoch 0 (penalty on,
    EMA signal state restored) and again after the stop gives the uninterrupted run exactly."""
    args = ["--data", weak_av_pkl, "--cp-backend", "foreach", *PLATEAU, *TINY]
    r = _cli("train", "--out", tmp_path / "a", "--epochs", 3, *args)
    assert r.exit_code == 0, r.output
    log = _log(tmp_path / "a")
    assert [x["modulation"]["cp_stopped_epoch"] for x in log] == [None, 1, 1]
    assert min(log[1]["balance"]["k"].values()) < 1.0          # the penalty acted before the stop
    assert all(v == 1.0 for v in log[2]["balance"]["k"].values())   # ... and never after it
    res = _results(tmp_path / "a")
    assert res["cp_stopped_epoch"] == [1] and res["per_seed"][0]["cp_stopped_epoch"] == 1
    for n in (1, 2, 3):   # resume after epoch 0 (before the stop) and after epoch 1 (the stop)
        r = _cli("train", "--out", tmp_path / "b", "--epochs", n, *(["--resume"] if n > 1 else []), *args)
        assert r.exit_code == 0, r.output
    assert _results(tmp_path / "b") == res
    b = _log(tmp_path / "b")
    for x, y in zip(log, b):
        x.pop("time_s"), y.pop("time_s")
    assert b == log


def test_plateau_does_not_stop_while_a_free_modality_improves(weak_av_pkl, tmp_path):
    """The same run with stop_delta = 0 and patience 2: the unpenalised heads keep improving."""
    args = ["--data", weak_av_pkl, "--cp-backend", "foreach", "--set", "cp.stop=plateau", "--set", "cp.stop_patience=2",
            *TINY]
    r = _cli("train", "--out", tmp_path, "--epochs", 3, *args)
    assert r.exit_code == 0, r.output
    log = _log(tmp_path)
    assert [x["modulation"]["cp_stopped_epoch"] for x in log] == [None, None, None]
    assert min(log[2]["balance"]["k"].values()) < 1.0
    assert json.loads((tmp_path / "results.json").read_text())["cp_stopped_epoch"] == [None]


def test_plateau_without_aux_heads_exits_2(tmp_path):
    r = _cli("train", "--out", tmp_path, "--epochs", 1, "--set", "cp.stop=plateau", "--set", "loss.aux=0", *TINY)
    assert r.exit_code == 2 and "error: cp.stop=plateau" in r.output, r.output
