"""Mixed precision for training (``train.amp = off | bf16 | fp16``).

The forward pass and the losses run under ``torch.autocast``; parameters, gradients and the
optimizer stay float32. ``fp16`` (CUDA only) scales the loss with a ``torch.amp.GradScaler`` and
unscales the gradients *before* the step guard and the modulator read them, so CP (and every
strategy) sees true gradients; a step whose unscaled gradients are not finite is one the guard
skips anyway, and the scaler then backs off (``skipped``). ``bf16`` needs no scaler; it runs on
CUDA and on the CPU (autocast cpu). The native CP kernel reads fp16/bf16 gradients, but with fp32
master weights the gradients it sees here are fp32.

    with amp.autocast(): out = model(...); loss = ...
    modulator.backward(amp.scale(loss), step)
    amp.unscale(optimizer)
    if not guard.check(loss): amp.skipped(); continue
    ...; amp.step(optimizer)
"""
from __future__ import annotations

import contextlib

import torch

from .errors import CPSLError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, mode: str, device, needs=frozenset()):
        self.mode = mode
        dev = torch.device(device)
        self.device_type = dev.type
        self.scaler = None
        if mode == "off":
            return
        if mode not in DTYPES:
            raise CPSLError(f"config key train.amp: {mode!r} is not one of off, bf16, fp16")
        if mode == "fp16":
            if dev.type != "cuda":
                raise CPSLError("train.amp=fp16 needs train.device=cuda (loss scaling on the GPU); "
                                "use train.amp=bf16 or off on the CPU")
            if "extra_backward" in needs:
                raise CPSLError("train.amp=fp16 cannot run a strategy with extra backward passes (their "
                                "gradients would mix scaled and unscaled losses); use train.amp=bf16 or off")
            self.scaler = torch.amp.GradScaler("cuda")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.mode])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def skipped(self) -> None:
        """The guard skipped the step: the scaler backs off (it saw the non-finite gradients)."""
        if self.scaler is not None:
            self.scaler.update()

    def step(self, optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
