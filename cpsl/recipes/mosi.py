"""The MOSI recipe as one library call (``cpsl recipe mosi``): :func:`run_recipe`.

Stages (each reuses its cached result when the inputs are the same):
1. data: ``cpsl data build-mosi`` (DIR/mosi/labels.csv + audio_opensmile.csv) and, unless an
   ``encoder`` is given, ``cpsl data build-mosei`` (DIR/mosei/labels.csv), frozen source-encoder
   states + token ids, into the cache (default ``$XDG_CACHE_HOME/cpsl/mosi_recipe``).
2. transfer: ``cpsl pretrain-text`` on the MOSEI pickle with ``mosei_transfer.yaml``
   into ``CACHE/enc_<tag>`` (a run stopped part-way is resumed; a finished one is reused).
   ``encoder`` skips 1b and 2 and starts from an already transferred encoder.
3. train: ``cpsl train --config mosi_best.yaml --set model.text_encoder=<encoder>`` on
   MOSI's standard train fold, checkpoint selected on valid, into OUT (``OUT/seed*/best.pt``).
   Where labels.csv has ``mode == test`` rows, the selected checkpoints are scored on them once.
4. ``kfold`` K: the same config trained (first seed) on K video-grouped folds of MOSI
   train + valid (never the test rows; :mod:`cpsl.kfold`); mean ± std of the fold-valid metrics,
   with ``kfold_baseline`` also for the source encoder fine-tuned on MOSI only.
5. the ridge line (frozen mean-pooled source-encoder states, :mod:`cpsl.baselines`) on valid (and test).
6. ``edge``: the device artefact (:mod:`cpsl.recipes.edge`): a 2–3 layer student distilled layer by
   layer from the seeds' ensemble on MOSI train + the MOSEI transcripts, int8, end to end, in
   ``OUT/edge/``; teacher, ensemble and student metrics and the student's batch-1 latency.

``OUT/results.json`` is cpsl train's (valid/test mean ± std, per seed, text head) plus a
``recipe`` block: encoder and its MOSEI valid metrics, ridge line, k-fold, wall time per stage.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CPSLError
from ..fileutil import content_tag as tag
from ..proc import run_cpsl

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class RecipeSettings:
    """What :func:`run_recipe` does; the options of ``cpsl recipe mosi``."""
    data_dir: str
    out: str
    seeds: str = "1,2,3"
    encoder: str | None = None            # an already transferred encoder folder (no MOSEI build, no transfer)
    config: str = str(CONFIGS / "mosi_best.yaml")
    transfer_config: str = str(CONFIGS / "mosei_transfer.yaml")
    source_encoder: str = "minilm"
    cache: str | None = None
    threads: int = 0
    kfold: int = 0
    kfold_baseline: bool = False
    kfold_only: bool = False
    transfer_max_steps: int = 0
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    epochs: int | None = None
    sets: list = field(default_factory=list)
    edge: bool = False
    edge_only: bool = False
    edge_layers: int = 3
    edge_epochs: int = 6
    edge_transfer: bool = True
    edge_transfer_rows: int = 0
    edge_audio: bool = False

    def check(self) -> None:
        if self.kfold_only and not self.kfold:
            raise CPSLError("--kfold-only needs --kfold K")
        if self.edge_only and not self.edge:
            self.edge = True
        if self.kfold and self.kfold < 2:
            raise CPSLError(f"--kfold must be >= 2 (or 0: off), got {self.kfold}")
        if self.resume and self.overwrite:
            raise CPSLError("--resume and --overwrite exclude each other")


def say(msg: str) -> None:
    print(msg, flush=True)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cpsl" / "mosi_recipe"



def load_yaml(path: str | Path) -> dict:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise CPSLError(f"recipe config not found: {path}")
    return yaml.safe_load(path.read_text()) or {}


def build(kind: str, data: Path, cache: Path, source: str, max_len: int, threads: int, quiet: bool, timing: dict) -> Path:
    """The cached MMSA pickle of MOSI (``kind`` mosi) or MOSEI, built from the data pack once."""
    from ..fileutil import sha256_file
    if kind == "mosi":
        ins = [data / "mosi" / "labels.csv", data / "mosi" / "audio_opensmile.csv"]
        args = ["data", "build-mosi", "--labels", ins[0], "--audio", ins[1]]
    else:
        ins = [data / "mosei" / "labels.csv"]
        args = ["data", "build-mosei", "--labels", ins[0]]
    for p in ins:
        if not p.is_file():
            raise CPSLError(f"{p} not found (--data-dir must have the data pack's layout)")
    out = cache / f"{kind}_{tag([sha256_file(p) for p in ins], source, max_len)}.pkl"
    if out.is_file():
        say(f"[data] {kind}: cached {out}")
        timing[f"build_{kind}_s"] = 0.0
        return out
    say(f"[data] building {kind} -> {out}")
    tmp = out.with_suffix(".tmp.pkl")
    timing[f"build_{kind}_s"] = run_cpsl([*args, "--text-encoder", source, "--max-len", max_len, "--out", tmp,
                                          *(["--quiet"] if quiet else [])], cache / f"build_{kind}.log", quiet, threads)
    Path(str(tmp) + ".json").replace(str(out) + ".json")
    tmp.replace(out)
    return out


def mosi_pickle(data_dir: str | Path, cache: str | Path | None = None, threads: int = 0, source: str = "minilm") -> Path:
    """The recipe's cached MOSI pickle (frozen ``source`` states, the transfer config's max_len)."""
    max_len = int(load_yaml(CONFIGS / "mosei_transfer.yaml").get("build", {}).get("max_len", 50))
    cache = Path(cache) if cache else default_cache()
    return build("mosi", Path(data_dir), cache, source, max_len, threads, True, {})


def transfer(mosei: Path, cache: Path, source: str, settings: dict, threads: int, max_steps: int, quiet: bool,
             timing: dict) -> Path:
    enc = cache / f"enc_{tag(mosei.name, source, settings)}"
    res = enc / "transfer.json"
    if res.is_file() and json.loads(res.read_text()).get("complete") and not max_steps:
        say(f"[transfer] cached {enc}")
        timing["transfer_s"] = 0.0
        return enc
    resume = (enc / "train_state.pt").is_file()
    say(f"[transfer] {'resuming' if resume else 'running'} pretrain-text -> {enc}")
    args = ["pretrain-text", "--data", mosei, "--out", enc, "--text-encoder", source, "--threads", threads]
    for k, v in settings.items():
        args += [f"--{k.replace('_', '-')}", v]
    args += ["--resume"] if resume else (["--overwrite"] if enc.exists() else [])
    if max_steps:
        args += ["--max-steps", max_steps]
    timing["transfer_s"] = run_cpsl([*args, *(["--quiet"] if quiet else [])], cache / "transfer.log", quiet, threads)
    return enc


def train_args(pkl: Path, out: Path, s: RecipeSettings, encoder: str, seeds: str, quiet: bool) -> list:
    args = ["train", "--data", pkl, "--out", out, "--config", s.config, "--seeds", seeds,
            "--set", f"model.text_encoder={encoder}", "--set", f"train.num_threads={s.threads}"]
    if s.epochs:
        args += ["--epochs", s.epochs]
    for x in s.sets:
        args += ["--set", x]
    return args + (["--quiet"] if quiet else [])


def kept_run_differences(results: dict, s: RecipeSettings, encoder) -> tuple[list[str], list[str]]:
    """Where the kept run's config differs from what this command trains (:func:`cpsl.runs.kept_run_differences`:
    where and how fast it ran aside), and the keys it did not record (written before they existed)."""
    from ..config import build_config
    from ..runs import kept_run_differences as differences
    sets = [f"model.text_encoder={encoder}", *s.sets, *([f"train.epochs={s.epochs}"] if s.epochs else [])]
    return differences(results.get("config", {}), build_config("teacher", str(s.config), sets))


def keep_trained(out: Path, s: RecipeSettings, encoder: Path, timing: dict) -> dict:
    """``kfold_only`` / ``edge_only``: the finished run in OUT, checked to be what this command would train."""
    flag = "--kfold-only" if s.kfold_only else "--edge-only"
    if not (out / "results.json").is_file():
        raise CPSLError(f"{flag} needs a finished recipe run in {out} (no results.json)")
    results = json.loads((out / "results.json").read_text())
    if results.get("recipe", {}).get("encoder") not in (None, str(encoder)):
        raise CPSLError(f"{out} was trained from {results['recipe']['encoder']}, not {encoder}")
    diff, unrecorded = kept_run_differences(results, s, encoder)
    if diff:
        raise CPSLError(f"{flag}: {out} was trained with another config than this command's "
                        f"({'; '.join(diff)}); pass the same --config, --set and --epochs")
    if unrecorded:
        say(f"[train] note: {out} predates the config keys {', '.join(unrecorded)} (not compared)")
    say(f"[train] skipped ({flag}): keeping {out}/results.json")
    timing.update(results.get("recipe", {}).get("timing", {}))    # the stage times of the kept run
    return results


def kfold(pkl: Path, s: RecipeSettings, variants: dict, cache: Path, out: Path, timing: dict,
          edge=None, mosei: Path | None = None) -> dict:
    """Each variant (name -> encoder) trained on the k video-grouped folds of train + valid (first seed);
    with ``edge`` (:class:`cpsl.recipes.edge.EdgeSettings`) also the first variant's edge student per
    fold (:func:`cpsl.recipes.edge.edge_kfold`, under the result's ``edge`` key)."""
    from ..kfold import FoldVariant, fold_pickles, train_folds
    paths = fold_pickles(pkl, s.kfold, cache)
    seed = s.seeds.split(",")[0]
    runs = []
    for name, encoder in variants.items():
        # finished folds are reused only for the same config, encoder, data, seed, epochs and --set
        run_tag = tag(Path(s.config).read_text(), encoder, pkl.name, seed, s.epochs, s.sets)
        runs.append(FoldVariant(name, out / "kfold" / f"{name}_{run_tag}",
                                lambda p, d, e=encoder: train_args(p, d, s, e, seed, True), {"encoder": encoder}))
    res = train_folds(paths, runs, int(seed), s.threads, timing, log=say)
    if edge is not None:
        from .edge import edge_kfold
        t0 = time.time()
        res["edge"] = edge_kfold(runs[0].folder, paths, seed, mosei, edge, say)
        timing["kfold_edge_s"] = time.time() - t0
    return res


def prepare_encoder(s: RecipeSettings, data: Path, cache: Path, max_len: int, settings: dict, timing: dict) -> Path:
    if s.encoder:
        encoder = Path(s.encoder)
        if not (encoder / "config.json").is_file():
            raise CPSLError(f"--encoder {encoder} is not a Hugging Face folder (no config.json)")
        return encoder
    mosei = build("mosei", data, cache, s.source_encoder, max_len, s.threads, s.quiet, timing)
    return transfer(mosei, cache, s.source_encoder, settings, s.threads, s.transfer_max_steps, s.quiet, timing)


def run_recipe(s: RecipeSettings) -> dict:
    """Run the recipe; returns (and writes to OUT/results.json) the results with their ``recipe`` block."""
    from ..baselines import ridge_splits
    s.check()
    data, out = Path(s.data_dir), Path(s.out)
    cache = Path(s.cache) if s.cache else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = load_yaml(s.transfer_config)
    max_len = int(tcfg.get("build", {}).get("max_len", 50))
    timing, t_all = {}, time.time()
    mosi = build("mosi", data, cache, s.source_encoder, max_len, s.threads, s.quiet, timing)
    encoder = prepare_encoder(s, data, cache, max_len, tcfg.get("transfer", {}), timing)
    t0 = time.time()
    if s.kfold_only or s.edge_only:
        results = keep_trained(out, s, encoder, timing)
    else:
        say(f"[train] {Path(s.config).name} from {encoder}, seeds {s.seeds} -> {out}")
        mode = ["--resume"] if s.resume else (["--overwrite"] if s.overwrite else [])
        run_cpsl(train_args(mosi, out, s, str(encoder), s.seeds, s.quiet) + mode, out / "train.log", s.quiet, s.threads)
        timing["train_s"] = time.time() - t0
        results = json.loads((out / "results.json").read_text())
    edge, mosei = None, None
    if s.edge:
        from .edge import EdgeSettings, run_edge
        t_edge = time.time()
        mosei = build("mosei", data, cache, s.source_encoder, max_len, s.threads, s.quiet, timing) \
            if s.edge_transfer else None
        edge = EdgeSettings(layers=s.edge_layers, epochs=s.edge_epochs, transfer=s.edge_transfer,
                            transfer_rows=s.edge_transfer_rows, audio=s.edge_audio, threads=s.threads,
                            distill={"progress": not s.quiet})
        results.update(run_edge(out, s.seeds, mosi, mosei, edge, say))
        timing["edge_s"] = time.time() - t_edge
    card = encoder / "transfer.json"
    rec = {"encoder": str(encoder), "source_encoder": s.source_encoder, "config": str(s.config),
           "transfer_config": str(s.transfer_config), "mosi_pickle": str(mosi),
           "encoder_mosei_valid": json.loads(card.read_text())["best"] if card.is_file() else None,
           "ridge": ridge_splits(mosi), "threads": s.threads, "nproc": os.cpu_count(),
           "selection": "checkpoint on MOSI valid loss; recipe choices by k-fold over train+valid (never test)"}
    if s.kfold:
        variants = {"transferred": str(encoder)}
        if s.kfold_baseline:
            variants["mosi_only"] = s.source_encoder
        rec["kfold"] = kfold(mosi, s, variants, cache, out, timing, edge, mosei)
    # --kfold-only / --edge-only keep the run's total
    timing["kfold_only_total_s" if s.kfold_only else "edge_only_total_s" if s.edge_only else "total_s"] = \
        time.time() - t_all
    rec["timing"] = timing
    results["recipe"] = rec
    (out / "results.json").write_text(json.dumps(results, indent=2))
    say(summary(results))
    return results


def _line(name: str, m: dict | None) -> str:
    if not m:
        return ""
    if isinstance(m.get("MAE"), dict):
        def f(k):
            return f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}"
    else:
        def f(k):
            return f"{m[k]:.4f}"
    return f"  {name:34s} Non0_acc_2 {f('Non0_acc_2')}  MAE {f('MAE')}  Corr {f('Corr')}\n"


def summary(r: dict) -> str:
    """The console summary of a recipe ``results.json``."""
    from ..compare import format_delta
    s = f"MOSI recipe, seeds {r['seeds']}:\n"
    for split in ("valid", "test"):
        if split in r:
            s += _line(f"{split}: fused", r[split]) + _line(f"{split}: text head", r[f"{split}_aux"]["text"])
    rec = r["recipe"]
    for split, m in rec["ridge"].items():
        s += _line(f"{split}: ridge line", m)
    if rec.get("kfold"):
        k = rec["kfold"]["k"]
        for name, v in rec["kfold"]["variants"].items():
            s += _line(f"k={k} folds: {name}", v["valid"]) + _line(f"k={k} folds: {name}, text head", v["valid_text_head"])
            for key, d in v.items():
                if key == "fused_minus_text_head" or key.startswith("minus_"):
                    s += f"  {'  ' + name + (' ' + key.replace('_', ' ')):34s} " + "  ".join(
                        f"Δ{m} {format_delta(d[m])}" for m in ("Non0_acc_2", "MAE", "Corr")) + "\n"
    ke = (rec.get("kfold") or {}).get("edge")
    if ke:
        def ci(d, fmt):
            lo, hi = d["ci95"] or (d["mean"], d["mean"])
            return f"{d['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"
        s += (f"  k={ke['k']} folds: {ke['layers']}-layer {ke['precision']} student vs its fold's teacher: Non0_acc_2 "
              f"retention {ci(ke['retention_non0_acc2'], '.1%')}, MAE {ci(ke['mae_vs_teacher'], '+.1%')}\n")
        so = ke.get("selection_optimism")
        if so:
            s += (f"    checkpoints kept on the scored rows: median epoch minus kept, MAE teacher "
                  f"{ci(so['teacher'], '+.3f')}, student {ci(so['student'], '+.3f')}; student fp32 vs teacher, "
                  f"median epochs: MAE {ci(so['mae_vs_teacher_median_epochs'], '+.1%')}\n")
        cf = ke.get("cross_fold_epochs")
        if cf:
            s += (f"    epochs chosen on the other folds (neither model on the rows it is scored on): student fp32 "
                  f"vs teacher MAE {ci(cf['mae_vs_teacher'], '+.1%')}"
                  + (f", Non0_acc_2 retention {ci(cf['retention_non0_acc2'], '.1%')}" if cf["retention_non0_acc2"] else "")
                  + "\n")
    if r.get("student"):
        st = r["student"]
        first = r["seeds"][0] if isinstance(r["seeds"], list) else str(r["seeds"]).split(",")[0]
        for split in ("valid", "test"):
            if split in st:
                s += _line(f"{split}: teacher (seed {first})", r["teacher"][split])
                s += _line(f"{split}: ensemble of {len(r['ensemble']['members'])}", r["ensemble"][split])
                s += _line(f"{split}: {st['layers']}-layer {st['precision']} student"
                           f"{'' if st.get('audio', True) else ' (text only)'}", st[split])
        s += (f"  edge artefact: {st['file']} ({st['bytes'] / 1e6:.1f} MB), batch 1 one thread "
              f"{st['latency_b1_p50_ms']:.2f} ms p50 (fp32 twin {r['student_fp32']['latency_b1_p50_ms']:.2f} ms)\n")
    if rec.get("encoder_mosei_valid"):
        s += _line("MOSEI valid (transfer, text only)", rec["encoder_mosei_valid"]["valid"])
    return s + "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in rec["timing"].items())
