"""The MOSI recipe as one command (issue 14): ``python bench/mosi.py --recipe best ...``.

    python bench/mosi.py --recipe best --data-dir DIR --out OUT [--seeds 1,2,3] [--encoder PATH]
                         [--kfold K [--kfold-baseline]] [--threads N] [--cache DIR]

Stages (each reuses its cached result when the inputs are the same):
1. data: ``cpsl data build-mosi`` (DIR/mosi/labels.csv + audio_opensmile.csv) and, unless
   ``--encoder`` is given, ``cpsl data build-mosei`` (DIR/mosei/labels.csv), frozen source-encoder
   states + token ids, into ``--cache`` (default ``$XDG_CACHE_HOME/cpsl/mosi_recipe``).
2. transfer: ``cpsl pretrain-text`` on the MOSEI pickle with ``configs/mosei_transfer.yaml``
   into ``CACHE/enc_<tag>`` (a run stopped part-way is resumed; a finished one is reused).
   ``--encoder PATH`` skips 1b and 2 and starts from an already transferred encoder.
3. train: ``cpsl train --config configs/mosi_best.yaml --set model.text_encoder=<encoder>`` on
   MOSI's standard train fold, checkpoint selected on valid, into OUT (``OUT/seed*/best.pt``).
   Where labels.csv has ``mode == test`` rows, the selected checkpoints are scored on them once.
4. ``--kfold K``: the same config trained (first seed) on K video-grouped folds of MOSI
   train + valid (never the test rows); mean ± std of the fold-valid metrics, with
   ``--kfold-baseline`` also for MiniLM fine-tuned on MOSI only (model.text_encoder=SOURCE).
5. the ridge line (frozen mean-pooled source-encoder states) on valid (and test).

``OUT/results.json`` is cpsl train's (valid/test mean ± std, per seed, text head) plus a
``recipe`` block: encoder and its MOSEI valid metrics, ridge line, k-fold, wall time per stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpsl" / "mosi_recipe"


def tag(*parts) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def sha(path: Path) -> str:
    from cpsl.fileutil import sha256_file
    return sha256_file(path)


def cpsl(args, log: Path | None, quiet: bool, threads: int = 0) -> float:
    """Run ``python -m cpsl ARGS``; output to ``log`` (and the console unless ``quiet``); wall seconds.
    ``threads`` > 0 also caps OpenMP/MKL threads of the process (the builders' encoding)."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "cpsl", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)   # a fresh machine has no cache folder yet
    if quiet:
        with open(log, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    else:
        r = subprocess.run(cmd, env=env)
    if r.returncode:
        raise SystemExit(f"error: failed ({r.returncode}): {' '.join(cmd[2:])}" + (f"; see {log}" if quiet else ""))
    return time.time() - t0


def load_yaml(path: Path) -> dict:
    import yaml
    if not path.is_file():
        raise SystemExit(f"error: recipe config not found: {path}")
    return yaml.safe_load(path.read_text()) or {}


def build(kind: str, data: Path, cache: Path, source: str, max_len: int, threads: int, quiet: bool, timing: dict) -> Path:
    if kind == "mosi":
        ins = [data / "mosi" / "labels.csv", data / "mosi" / "audio_opensmile.csv"]
        args = ["data", "build-mosi", "--labels", ins[0], "--audio", ins[1]]
    else:
        ins = [data / "mosei" / "labels.csv"]
        args = ["data", "build-mosei", "--labels", ins[0]]
    for p in ins:
        if not p.is_file():
            raise SystemExit(f"error: {p} not found (--data-dir must have the data pack's layout)")
    out = cache / f"{kind}_{tag([sha(p) for p in ins], source, max_len)}.pkl"
    if out.is_file():
        print(f"[data] {kind}: cached {out}", flush=True)
        timing[f"build_{kind}_s"] = 0.0
        return out
    print(f"[data] building {kind} -> {out}", flush=True)
    tmp = out.with_suffix(".tmp.pkl")
    timing[f"build_{kind}_s"] = cpsl([*args, "--text-encoder", source, "--max-len", max_len, "--out", tmp,
                                      *(["--quiet"] if quiet else [])], cache / f"build_{kind}.log", quiet, threads)
    Path(str(tmp) + ".json").replace(str(out) + ".json")
    tmp.replace(out)
    return out


def transfer(mosei: Path, cache: Path, source: str, settings: dict, threads: int, max_steps: int, quiet: bool,
             timing: dict) -> Path:
    enc = cache / f"enc_{tag(mosei.name, source, settings)}"
    res = enc / "transfer.json"
    if res.is_file() and json.loads(res.read_text()).get("complete") and not max_steps:
        print(f"[transfer] cached {enc}", flush=True)
        timing["transfer_s"] = 0.0
        return enc
    resume = (enc / "train_state.pt").is_file()
    print(f"[transfer] {'resuming' if resume else 'running'} pretrain-text -> {enc}", flush=True)
    args = ["pretrain-text", "--data", mosei, "--out", enc, "--text-encoder", source, "--threads", threads]
    for k, v in settings.items():
        args += [f"--{k.replace('_', '-')}", v]
    args += ["--resume"] if resume else (["--overwrite"] if enc.exists() else [])
    if max_steps:
        args += ["--max-steps", max_steps]
    timing["transfer_s"] = cpsl([*args, *(["--quiet"] if quiet else [])], cache / "transfer.log", quiet, threads)
    return enc


def train_args(pkl: Path, out: Path, config: Path, encoder: str, seeds: str, threads: int, epochs, sets, quiet) -> list:
    args = ["train", "--data", pkl, "--out", out, "--config", config, "--seeds", seeds,
            "--set", f"model.text_encoder={encoder}", "--set", f"train.num_threads={threads}"]
    if epochs:
        args += ["--epochs", epochs]
    for s in sets:
        args += ["--set", s]
    return args + (["--quiet"] if quiet else [])


def kept_run_differences(results: dict, a, encoder) -> tuple[list[str], list[str]]:
    """``key (kept → this command)`` where the kept run's config differs from what this command
    trains, ignoring where and how fast it ran (cpsl.compare.IGNORED_KEYS); and the keys the kept
    run did not record (written before they existed)."""
    from cpsl.compare import differing_keys
    from cpsl.config import build_config, flatten
    sets = [f"model.text_encoder={encoder}", *a.sets, *([f"train.epochs={a.epochs}"] if a.epochs else [])]
    now = flatten(build_config("teacher", str(a.config), sets).to_dict())
    kept = flatten(results.get("config", {}))
    diff = [f"{k} ({kept[k]!r} -> {now.get(k)!r})" for k in differing_keys(kept, now) if k in kept]
    return diff, sorted(k for k in now if k not in kept)


def kfold(pkl: Path, k: int, variants: dict, a, cache: Path, out: Path, timing: dict) -> dict:
    """Each variant trained on the k video-grouped folds of train + valid (first seed); fold-valid mean ± std."""
    from cpsl.data.folds import video_folds
    from cpsl.data.mmsa import load_mmsa, save_mmsa
    from cpsl.metrics import mean_std
    sys.path.insert(0, str(ROOT / "bench"))
    from mosi import epoch_times
    folds_dir = cache / f"folds_{pkl.stem}_k{k}"
    paths = [folds_dir / f"fold{i}.pkl" for i in range(k)]
    if not all(p.is_file() for p in paths):
        for i, d in enumerate(video_folds(load_mmsa(pkl), k, seed=0)):
            save_mmsa(d, paths[i])
    seed = a.seeds.split(",")[0]
    signature = folds_signature(paths)
    res = {}
    for name, encoder in variants.items():
        per_fold, fold_time = [], 0.0
        # finished folds are reused only for the same config, encoder, data, seed, epochs and --set
        run_tag = tag(Path(a.config).read_text(), encoder, pkl.name, seed, a.epochs, a.sets)
        for i, p in enumerate(paths):
            d = out / "kfold" / f"{name}_{run_tag}" / f"fold{i}"
            print(f"[kfold] {name} fold {i + 1}/{k}", flush=True)
            if not (d / "results.json").is_file():
                d.parent.mkdir(parents=True, exist_ok=True)
                cpsl(train_args(p, d, a.config, encoder, seed, a.threads, a.epochs, a.sets, True) + ["--overwrite"],
                     d.parent / f"fold{i}.log", True, a.threads)
            per_fold.append(json.loads((d / "results.json").read_text()))
            fold_time += sum(epoch_times(d))      # the run's own epoch time: a reused fold counts what it took
        fused = [r["per_seed"][0]["valid"] for r in per_fold]
        text = [r["per_seed"][0]["valid_aux"]["text"] for r in per_fold]
        res[name] = {"encoder": encoder, "valid": mean_std(fused), "valid_text_head": mean_std(text),
                     "per_fold": {"valid": fused, "valid_text_head": text},
                     "fused_minus_text_head": paired(fused, text)}
        timing[f"kfold_{name}_s"] = fold_time
    first = next(iter(res))
    for name in list(res)[1:]:      # the same folds: paired over folds
        res[first][f"minus_{name}"] = paired(res[first]["per_fold"]["valid"], res[name]["per_fold"]["valid"])
    return {"k": k, "seed": int(seed), "grouping": "video id, train+valid pooled (test rows never used)",
            "folds_signature": signature, "variants": res}


def folds_signature(paths: list[Path]) -> str:
    """blake2b of each fold's segment ids, labels and token ids, per split: the same signature means
    the same folds, whatever float noise the frozen encoder states carry from machine to machine."""
    import numpy as np
    from cpsl.data.mmsa import load_mmsa
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        for name, sp in sorted(load_mmsa(p).splits.items()):
            h.update(name.encode() + b"\0" + "\0".join(map(str, sp.ids)).encode())
            h.update(np.ascontiguousarray(sp.labels, dtype=np.float32).tobytes())
            if sp.text_bert is not None:
                h.update(np.ascontiguousarray(sp.text_bert).tobytes())
    return h.hexdigest()


def paired(a: list[dict], b: list[dict]) -> dict:
    """Fold-paired a − b of MAE, Corr and Non0_acc_2: mean with its 95 % t-interval."""
    from cpsl.ablate import paired_difference
    from cpsl.compare import METRICS
    return {m: paired_difference([x[m] for x in a], [y[m] for y in b]) for m in METRICS}


def compare_kfold(files: list[str], variant: str = "transferred", assume_same_folds: bool = False) -> str:
    """Markdown: the k-fold of ``variant`` in each recipe ``results.json``, paired fold by fold with
    the first file's (the same folds: k, seed and folds_signature checked). Two recipe configs or
    encoders compared on the k-fold estimate without retraining either."""
    from cpsl.compare import format_delta, format_mean_std
    runs = []
    for f in map(Path, files):
        if not f.is_file():
            raise SystemExit(f"error: {f} not found")
        r = json.loads(f.read_text())
        kf = r.get("recipe", {}).get("kfold")
        if not kf or variant not in kf["variants"]:
            raise SystemExit(f"error: {f} has no k-fold of the variant {variant!r} (run the recipe with --kfold K)")
        runs.append((f, r, kf))
    f0, r0, k0 = runs[0]
    notes = []
    for f, r, kf in runs[1:]:
        for what, a, b in (("k", kf["k"], k0["k"]), ("seed", kf["seed"], k0["seed"])):
            if a != b:
                raise SystemExit(f"error: {f} and {f0} differ in {what} ({a!r} vs {b!r}): not the same folds")
        if kf.get("folds_signature") and k0.get("folds_signature"):
            if kf["folds_signature"] != k0["folds_signature"]:
                raise SystemExit(f"error: {f} and {f0} differ in their folds' segments, labels or tokens "
                                 "(folds_signature): not the same folds")
        elif r.get("data_fingerprint") != r0.get("data_fingerprint"):
            old = f if not kf.get("folds_signature") else f0
            if not assume_same_folds:
                raise SystemExit(f"error: {f} and {f0} differ in the MOSI data fingerprint and {old} predates "
                                 "fold signatures, so their folds cannot be checked; pass --assume-same-folds if "
                                 "both came from the same labels.csv (the same segments and labels)")
            notes.append(f"`{old}` records no fold signature and the MOSI data fingerprints differ "
                         "(frozen encoder states differ across machines): the folds are assumed to be the same "
                         "(--assume-same-folds).")
    folds = [kf["variants"][variant]["per_fold"]["valid"] for _, _, kf in runs]
    lines = [f"k = {k0['k']} video-grouped folds of MOSI train + valid, seed {k0['seed']}, variant `{variant}`; "
             f"Δ = run − `{f0}` paired over folds, mean [95 % t-interval], `*` = the interval excludes 0.",
             *notes, "",
             "| run | encoder | per-fold MAE | MAE | Δ MAE | Corr | Δ Corr | Non0_acc_2 | Δ Non0_acc_2 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, ((f, _, kf), pf) in enumerate(zip(runs, folds)):
        v, d = kf["variants"][variant], paired(pf, folds[0])
        cells = [f"`{f}`", f"`{Path(v['encoder']).name}`", " ".join(f"{x['MAE']:.3f}" for x in pf)]
        for m in ("MAE", "Corr", "Non0_acc_2"):
            cells += [format_mean_std(v["valid"][m]), format_delta(d[m]) if i else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ridge(pkl: Path) -> dict:
    """The ridge line on valid and (where it has rows) test."""
    from cpsl.data.mmsa import load_mmsa
    sys.path.insert(0, str(ROOT / "bench"))
    from mosi import ridge_baseline
    d = load_mmsa(pkl)
    return {s: ridge_baseline(pkl, split=s, data=d) for s in ("valid", "test") if len(d[s])}


def run_recipe(a) -> dict:
    data, out = Path(a.data_dir), Path(a.out)
    cache = Path(a.cache) if a.cache else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    a.config = Path(a.config)
    tcfg = load_yaml(Path(a.transfer_config))
    build_cfg, settings = tcfg.get("build", {}), tcfg.get("transfer", {})
    max_len = int(build_cfg.get("max_len", 50))
    timing, t_all = {}, time.time()
    mosi = build("mosi", data, cache, a.source_encoder, max_len, a.threads, a.quiet, timing)
    if a.encoder:
        encoder = Path(a.encoder)
        if not (encoder / "config.json").is_file():
            raise SystemExit(f"error: --encoder {encoder} is not a Hugging Face folder (no config.json)")
    else:
        mosei = build("mosei", data, cache, a.source_encoder, max_len, a.threads, a.quiet, timing)
        encoder = transfer(mosei, cache, a.source_encoder, settings, a.threads, a.transfer_max_steps, a.quiet, timing)
    t0 = time.time()
    if a.kfold_only:
        if not (out / "results.json").is_file():
            raise SystemExit(f"error: --kfold-only needs a finished recipe run in {out} (no results.json)")
        results = json.loads((out / "results.json").read_text())
        if results.get("recipe", {}).get("encoder") not in (None, str(encoder)):
            raise SystemExit(f"error: {out} was trained from {results['recipe']['encoder']}, not {encoder}")
        diff, unrecorded = kept_run_differences(results, a, encoder)
        if diff:
            raise SystemExit(f"error: --kfold-only: {out} was trained with another config than this command's "
                             f"({'; '.join(diff)}); pass the same --config, --set and --epochs")
        if unrecorded:
            print(f"[train] note: {out} predates the config keys {', '.join(unrecorded)} (not compared)", flush=True)
        print(f"[train] skipped (--kfold-only): keeping {out}/results.json", flush=True)
        timing.update(results.get("recipe", {}).get("timing", {}))    # the stage times of the kept run
    else:
        print(f"[train] {a.config.name} from {encoder}, seeds {a.seeds} -> {out}", flush=True)
        mode = ["--resume"] if a.resume else (["--overwrite"] if a.overwrite else [])
        cpsl(train_args(mosi, out, a.config, str(encoder), a.seeds, a.threads, a.epochs, a.sets, a.quiet) + mode,
             out / "train.log", a.quiet, a.threads)
        timing["train_s"] = time.time() - t0
        results = json.loads((out / "results.json").read_text())
    card = encoder / "transfer.json"
    rec = {"encoder": str(encoder), "source_encoder": a.source_encoder, "config": str(a.config),
           "transfer_config": str(a.transfer_config), "mosi_pickle": str(mosi),
           "encoder_mosei_valid": json.loads(card.read_text())["best"] if card.is_file() else None,
           "ridge": ridge(mosi), "threads": a.threads, "nproc": os.cpu_count(),
           "selection": "checkpoint on MOSI valid loss; recipe choices by k-fold over train+valid (never test)"}
    if a.kfold:
        variants = {"transferred": str(encoder)}
        if a.kfold_baseline:
            variants["mosi_only"] = a.source_encoder
        rec["kfold"] = kfold(mosi, a.kfold, variants, a, cache, out, timing)
    timing["kfold_only_total_s" if a.kfold_only else "total_s"] = time.time() - t_all   # --kfold-only keeps the run's
    rec["timing"] = timing
    results["recipe"] = rec
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(summary(results), flush=True)
    return results


def summary(r: dict) -> str:
    from cpsl.compare import format_delta
    def line(name, m):
        if not m:
            return ""
        f = (lambda k: f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}") if isinstance(m.get("MAE"), dict) else (lambda k: f"{m[k]:.4f}")
        return f"  {name:34s} Non0_acc_2 {f('Non0_acc_2')}  MAE {f('MAE')}  Corr {f('Corr')}\n"
    s = f"MOSI recipe, seeds {r['seeds']}:\n"
    for split in ("valid", "test"):
        if split in r:
            s += line(f"{split}: fused", r[split]) + line(f"{split}: text head", r[f"{split}_aux"]["text"])
    rec = r["recipe"]
    for split, m in rec["ridge"].items():
        s += line(f"{split}: ridge line", m)
    if rec.get("kfold"):
        for name, v in rec["kfold"]["variants"].items():
            s += line(f"k={rec['kfold']['k']} folds: {name}", v["valid"])
            s += line(f"k={rec['kfold']['k']} folds: {name}, text head", v["valid_text_head"])
            for key, d in v.items():
                if key == "fused_minus_text_head" or key.startswith("minus_"):
                    s += f"  {'  ' + name + (' ' + key.replace('_', ' ')):34s} " + "  ".join(
                        f"Δ{m} {format_delta(d[m])}" for m in ("Non0_acc_2", "MAE", "Corr")) + "\n"
    if rec.get("encoder_mosei_valid"):
        s += line("MOSEI valid (transfer, text only)", rec["encoder_mosei_valid"]["valid"])
    return s + "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in rec["timing"].items())


def add_arguments(ap) -> None:
    g = ap.add_argument_group("recipe (--recipe best)")
    g.add_argument("--recipe", choices=("best",), help="run the MOSI recipe (transfer + fused model) instead of the variants")
    g.add_argument("--encoder", help="an already transferred encoder folder (skips the MOSEI build and transfer)")
    g.add_argument("--config", default=str(CONFIGS / "mosi_best.yaml"), help="cpsl train config of the fused model")
    g.add_argument("--transfer-config", default=str(CONFIGS / "mosei_transfer.yaml"),
                   help="build + pretrain-text settings of the transfer")
    g.add_argument("--source-encoder", default="minilm", help="the encoder the transfer starts from")
    g.add_argument("--cache", help="pickles and the transferred encoder (default $XDG_CACHE_HOME/cpsl/mosi_recipe)")
    g.add_argument("--threads", type=int, default=0, help="torch threads of every stage (0: torch's default)")
    g.add_argument("--kfold", type=int, default=0, help="also k-fold cross-validate the config over train+valid")
    g.add_argument("--kfold-baseline", action="store_true", help="k-fold MiniLM fine-tuned on MOSI only as well")
    g.add_argument("--kfold-only", action="store_true",
                   help="with --kfold: keep OUT's finished training run (its results.json) and only add the k-fold")
    g.add_argument("--kfold-compare", nargs="+", metavar="RESULTS_JSON",
                   help="only compare: the k-folds of recipe results.json files, paired with the first's; no training")
    g.add_argument("--kfold-variant", default="transferred", help="the k-fold variant --kfold-compare reads")
    g.add_argument("--assume-same-folds", action="store_true",
                   help="--kfold-compare of a run that predates fold signatures, on other MOSI features")
    g.add_argument("--transfer-max-steps", type=int, default=0, help=argparse_suppress())
    g.add_argument("--resume", action="store_true", help="continue a stopped training run in OUT")
    g.add_argument("--overwrite", action="store_true", help="replace a training run already in OUT")
    g.add_argument("--quiet", action="store_true", help="logs to files instead of the console")


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS
