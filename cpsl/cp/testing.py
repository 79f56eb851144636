"""Helpers for checking CP backends against the ``reference`` oracle (used by the tests and
by ``bench/cuda_driver.py``); they need torch only."""
from __future__ import annotations

import torch

from .core import CPStats, stats_size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_grads(sizes, groups, dtypes=None, present=None, scales=None, seed=0, device="cpu"):
    """Random gradients: ``sizes[i]`` elements, scaled by ``scales[groups[i]]``; None where
    ``present[i]`` is False; dtype names or torch dtypes in ``dtypes``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, m) in enumerate(zip(sizes, groups)):
        if present is not None and not present[i]:
            out.append(None)
            continue
        s = 1.0 if scales is None else scales[m]
        dt = torch.float32 if dtypes is None else DTYPES[dtypes[i]] if isinstance(dtypes[i], str) else dtypes[i]
        out.append((torch.randn(n, generator=gen) * s).to(dt).to(device))
    return out


def clone(grads):
    return [None if g is None else g.clone() for g in grads]


def assert_matches(nat: torch.Tensor, ref: torch.Tensor, G: int, rtol=1e-6, katol=1e-6):
    """norms rtol 1e-6, identical conflict flags and guard, k within 1e-6."""
    assert nat.dtype == torch.float64 and nat.shape == (stats_size(G),)
    nat, ref = nat.detach().cpu(), ref.detach().cpu()
    a, b = CPStats.unpack(nat, G), CPStats.unpack(ref, G)
    assert torch.equal(a.guard, b.guard), (nat, ref)
    assert torch.equal(a.conflict, b.conflict), (nat, ref)
    torch.testing.assert_close(a.sumsq, b.sumsq, rtol=rtol, atol=0.0, equal_nan=True)
    torch.testing.assert_close(a.ghat, b.ghat, rtol=rtol, atol=0.0, equal_nan=True)
    torch.testing.assert_close(a.r, b.r, rtol=2 * rtol, atol=0.0)
    torch.testing.assert_close(a.k, b.k, rtol=0.0, atol=katol)


def expected_scaled(g: torch.Tensor, k: float) -> torch.Tensor:
    """The scale pass's definition: one fp32 multiply by (float)k, one rounding to the dtype."""
    return (g.float() * torch.tensor(k, dtype=torch.float32, device=g.device)).to(g.dtype)


def stats_with_k(ks) -> torch.Tensor:
    """A stats buffer whose only non-zero field is k (for testing the scale pass alone)."""
    G = len(ks)
    s = torch.zeros(stats_size(G), dtype=torch.float64)
    s[3 * G:4 * G] = torch.tensor(ks, dtype=torch.float64)
    return s
