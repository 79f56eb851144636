#!/usr/bin/env python
"""A small driver of every native CP entry point, for compute-sanitizer (bench/gpu_check.sh).

    python bench/cuda_driver.py [--device cuda|cpu]

Stats, scale and the fused step over fp32/fp16/bf16 chunks, a view that starts 4 bytes
into its allocation (the alignment peel: a real view, not a copy), an empty and a missing
gradient, a channels-last gradient, gradients in a GradArena (merged runs), a CUDA graph
captured and replayed after ``clear_cache()`` and eviction (twice, with the schedule weight
changed in its control block between the replays), and a side stream. Every
result is checked against the float64 reference; exit 0 only when all agree. ``--device
cpu`` runs the same checks (no graph) so that the driver itself is tested without a GPU.
Run under memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that out-of-bounds accesses
hit real allocation boundaries instead of the caching allocator's slack (the graph part is
skipped then: a capture cannot cudaMalloc; racecheck and synccheck run it).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from cpsl.cp import native
from cpsl.cp.arena import GradArena
from cpsl.cp.core import CPStats, PenaltyParams, penalty_control
from cpsl.cp.reference import reference_stats
from cpsl.cp.testing import assert_matches, expected_scaled

P = PenaltyParams()


def layout(dev):
    torch.manual_seed(0)
    base = torch.randn(70001, device=dev) * 4
    grads = [base[1:],  # 4 bytes into the allocation: peeled head, vector body, tail
             torch.randn(3, 65, device=dev).half(), torch.randn(40000, device=dev).bfloat16(),
             torch.randn(0, device=dev), None, torch.randn(5, device=dev),
             torch.randn(4, 6, 3, 3, device=dev).to(memory_format=torch.channels_last)]
    return grads, [0, 1, 1, 2, 2, 2, 1]


def check_step(grads, gi, G=3):
    ref = reference_stats(grads, gi, G, P, 1.0)
    before = [None if g is None else g.clone() for g in grads]
    s = native.cp_stats(grads, gi, G, P, 1.0)
    assert_matches(s, ref, G)
    native.cp_scale_(grads, gi, s, G)
    k = CPStats.unpack(s, G).k.tolist()
    for g, b, m in zip(grads, before, gi):
        if g is not None:
            assert torch.equal(g, expected_scaled(b, k[m])), "scale pass differs"
    for g, b in zip(grads, before):
        if g is not None:
            g.copy_(b)
    s2 = native.cp_step_(grads, gi, G, P, 1.0)
    assert torch.equal(s2, s), "fused step differs from stats"
    return s


def check_arena(dev):
    torch.manual_seed(1)
    nets = {m: torch.nn.Sequential(torch.nn.Linear(13, 10), torch.nn.Linear(10, 1)).to(dev) for m in "tav"}
    arena = GradArena({m: list(n.parameters()) for m, n in nets.items()})
    x = torch.randn(7, 13, device=dev)
    sum((n(x) * (i + 2)).sum() for i, n in enumerate(nets.values())).backward()
    check_step([p.grad for p in arena.params], [i // 4 for i in range(len(arena.params))])


def check_graph(dev):
    grads, gi = layout(dev)
    check_step(grads, gi)  # builds the plan outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        native.cp_step_(grads, gi, 3, P, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    ctl = penalty_control(1.0, True, dev)  # the schedule weight, read by the kernel on replay
    native.cp_step_(grads, gi, 3, P, ctl)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = native.cp_step_(grads, gi, 3, P, ctl)
        handle = native.capture_handle()
    native.clear_cache()
    for i in range(native.MAX_PLANS + 2):  # evictions: the captured plan must survive
        native.cp_step_([torch.randn(1000 + i, device=dev)], [0], 1, P, 1.0)
    for w in (1.0, 0.5):  # a schedule change between replays
        ctl[0].fill_(w)
        pristine = [None if g is None else g.clone() for g in grads]
        ref = reference_stats(pristine, gi, 3, P, w)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, ref, 3)
    del graph
    native.release_graph_plans(handle)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    a = ap.parse_args(argv)
    ok, why = native.available(a.device)
    if not ok:
        print(f"error: native CP backend cannot run on {a.device}: {why}", file=sys.stderr)
        return 2
    grads, gi = layout(a.device)
    check_step(grads, gi)
    check_arena(a.device)
    if a.device == "cuda":
        if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
            # without the caching allocator, allocations inside a capture call cudaMalloc, which
            # a stream capture forbids: the graph path runs under racecheck/synccheck instead
            print("note: PYTORCH_NO_CUDA_MEMORY_CACHING=1: CUDA graph part skipped")
        else:
            check_graph(a.device)
        torch.cuda.synchronize()
    print(f"driver ok ({a.device}; plans built: {native.plan_builds()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
