"""Cost of CP inside a real training step: the teacher model on the synthetic data, one step =
zero_grad + forward + loss + backward + [modulation] + clip + AdamW, with modulation none /
CP foreach / CP native (update mode, the default). Median over many steps after warm-up.

The CP variants keep their groups' gradients in a gradient arena (cpsl.cp.arena, as
cpsl.train does); ``cp-native-noarena`` zeroes with ``set_to_none=True`` instead, which
hands the native backend new gradient pointers every step. Per variant: ``plan_builds``
(native plans built during the run: 1 with the arena), ``cp_ms_median`` (time inside
``modulator.after_backward``, the loop's hook point 5; CUDA: events around it) and
``cp_share_pct`` (its share of the step).

    python bench/train_step.py [--device cpu|cuda] [--steps 30] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from benchkit.errors import bench_main
from benchkit.machine import base_info  # bench/ is sys.path[0]


def time_variant(a, dev, data, batches, modulation: str, backend: str, use_arena: bool) -> dict:
    """Median wall time of a training step and of its modulation call, for one variant."""
    from cpsl.config import preset
    from cpsl.cp import native
    from cpsl.cp.arena import GradArena
    from cpsl.losses import total_loss
    from cpsl.strategies import Step
    from cpsl.train import build_model, build_modulator, build_optimizer, set_seed

    cfg = preset(a.preset)
    cfg.train.modulation = modulation
    cfg.cp.backend = backend if modulation == "cp" else "auto"
    cfg.groups.diagnostics = False  # the baseline step measures nothing
    cfg.train.device = a.device
    set_seed(0)
    model = build_model(cfg, data).to(dev).train()
    opt = build_optimizer(model, cfg, model.modality_parameters())
    mod = build_modulator(cfg, model, opt, dev)
    arena = GradArena.for_modulator(mod, opt) if use_arena else None  # binds opt.zero_grad
    params = [p for p in model.parameters() if p.requires_grad]
    times, cp_times = [], []
    builds0 = native.plan_builds()
    for i in range(a.warmup + a.steps):
        b = batches[i % len(batches)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(b.x, b.mask)
        loss, terms = total_loss(out, b.y, cfg.loss, 5)
        loss.backward()
        if dev.type == "cuda":
            ev[0].record()
        t1 = time.perf_counter()
        mod.after_backward(Step(5, b, out, terms, loss))
        t_cp = time.perf_counter() - t1
        if dev.type == "cuda":
            ev[1].record()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            t_cp = ev[0].elapsed_time(ev[1]) / 1e3
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            cp_times.append(t_cp * 1e3)
    name = "none" if modulation == "none" else f"cp-{backend}" + ("" if use_arena else "-noarena")
    med, cp_med = statistics.median(times), statistics.median(cp_times)
    row = {"variant": name, "device": a.device, "ms_median": med,
           "ms_p10": sorted(times)[len(times) // 10], "steps": a.steps, "warmup": a.warmup,
           "params": sum(p.numel() for p in params), "grad_arena": arena is not None,
           "cp_ms_median": cp_med, "cp_share_pct": 100.0 * cp_med / med,
           "plan_builds": native.plan_builds() - builds0}
    print(f"{name:18s} {med:8.2f} ms/step (median of {a.steps}); modulation {cp_med:6.3f} ms "
          f"= {100.0 * cp_med / med:5.2f} % of the step; native plans built: {row['plan_builds']}",
          flush=True)
    return row


@bench_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--preset", default="teacher")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    from cpsl.cp.penalty import resolve_backend
    from cpsl.data.batch import make_batch
    from cpsl.data.synthetic import generate

    dev = torch.device(a.device)
    data = generate()
    rows = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(0)).numpy()
    batches = [make_batch(data["train"], rows[i:i + a.batch_size]).to(dev)
               for i in range(0, a.batch_size * 8, a.batch_size)]
    variants = [("none", "none", None, False), ("cp", "foreach", "update", True)]
    be, why = resolve_backend("auto", dev)
    if be == "native":
        variants += [("cp", "native", "update", True), ("cp", "native", "update", False)]
    results = [time_variant(a, dev, data, batches, modulation, backend, use_arena)
               for modulation, backend, _mode, use_arena in variants]
    base = results[0]["ms_median"]
    for r in results[1:]:
        r["overhead_pct"] = 100.0 * (r["ms_median"] - base) / base
        print(f"{r['variant']:18s} overhead vs none: {r['overhead_pct']:+.2f}%")
    if be != "native":
        print(f"native backend not available here: {why}")
    meta = {"machine": base_info(str(dev)), "batch_size": a.batch_size, "preset": a.preset}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
