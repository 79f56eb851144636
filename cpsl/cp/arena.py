"""Gradient arena: stable, aligned gradient memory for the CP groups.

Every parameter of a CP group gets its ``.grad`` as a view into one flat buffer per
(group, dtype, device); each view starts on a 16-byte boundary (sizes are padded up, the
padding stays zero). Zeroing clears the buffers in place, so the gradient pointers never
change: the native backend builds ONE plan for a whole training run (``set_to_none=True``
would hand it new pointers every step), and its stats pass reads long aligned runs
(back-to-back views are merged into one run). Autograd accumulates into an existing
``.grad`` in place, so backward writes straight into the arena (the idea of DDP's
``gradient_as_bucket_view``).

    arena = GradArena.for_modulator(cp, optimizer)   # cp: a ConflictAwarePenalty (e.g. the ``cp`` strategy)
    for batch in data:
        optimizer.zero_grad(set_to_none=True)   # bound: arena buffers <- 0, other grads <- None
        loss.backward(); cp.step(epoch); optimizer.step()

``for_modulator`` binds the optimizer's ``zero_grad`` to :meth:`GradArena.zero_grad`, so the
gradient memory stays put whatever ``set_to_none`` says (as gradients stay bucket views
under DDP's ``gradient_as_bucket_view``); ``unbind()`` restores it.

Semantics: a parameter of a CP group that gets no gradient in a step keeps a zero
gradient (as with ``zero_grad(set_to_none=False)``) instead of None: its group counts as
active with ĝ = 0, and AdamW applies weight decay and momentum to it. In the CPSL model
every modality's encoder takes part in every step, so nothing changes there.
"""
from __future__ import annotations

from typing import Iterable

import torch

ALIGN_BYTES = 16


class GradArena:
    def __init__(self, groups: dict[str, list[torch.nn.Parameter]], others: Iterable[torch.nn.Parameter] = ()):
        """``groups``: name -> parameters (a parameter listed twice keeps its first slot);
        ``others``: parameters outside the arena whose grads :meth:`zero_grad` sets to None."""
        seen: set[int] = set()
        self.names = tuple(groups)
        self.params: list[torch.nn.Parameter] = []
        self.views: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        for name in self.names:
            by_kind: dict[tuple, list[torch.nn.Parameter]] = {}
            for p in groups[name]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    by_kind.setdefault((p.dtype, p.device), []).append(p)
            for (dtype, device), plist in by_kind.items():
                self._carve(plist, dtype, device)
        self.others = [p for p in others if id(p) not in seen]
        self._bound = None
        self.attach()

    def _carve(self, plist, dtype, device) -> None:
        step = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        offsets, total = [], 0
        for p in plist:
            offsets.append(total)
            total += -(-p.numel() // step) * step
        buf = torch.zeros(max(total, step), dtype=dtype, device=device)
        if buf.data_ptr() % ALIGN_BYTES:  # pragma: no cover - the allocators align to >= 64 bytes
            raise RuntimeError(f"gradient arena buffer at {buf.data_ptr():#x} is not {ALIGN_BYTES}-byte aligned")
        self.buffers.append(buf)
        for p, off in zip(plist, offsets):
            view = buf[off:off + p.numel()].view(p.shape)
            if p.grad is not None:
                view.copy_(p.grad)
            self.params.append(p)
            self.views.append(view)

    @classmethod
    def for_modulator(cls, modulator, optimizer=None) -> "GradArena | None":
        """The arena over a :class:`~cpsl.cp.penalty.ConflictAwarePenalty`'s groups (None for
        other modulators); ``optimizer``'s remaining parameters are zeroed to None."""
        from .penalty import ConflictAwarePenalty
        if not isinstance(modulator, ConflictAwarePenalty):
            return None
        groups: dict[str, list] = {n: [] for n in modulator.names}
        for p, gi in zip(modulator.params, modulator.group_index):
            groups[modulator.names[gi]].append(p)
        others = [p for pg in optimizer.param_groups for p in pg["params"]] if optimizer is not None else ()
        arena = cls(groups, others)
        if optimizer is not None:
            arena.bind(optimizer)
        return arena

    def bind(self, optimizer) -> None:
        """``optimizer.zero_grad(set_to_none=...)`` calls :meth:`zero_grad` from now on."""
        self.unbind()

        def zero_grad(set_to_none: bool = True) -> None:  # noqa: ARG001 - the arena decides
            self.zero_grad()

        optimizer.zero_grad = zero_grad
        self._bound = optimizer

    def unbind(self) -> None:
        opt = getattr(self, "_bound", None)
        if opt is not None and "zero_grad" in vars(opt):
            del opt.zero_grad  # back to the class's method
        self._bound = None

    def attach(self) -> None:
        """(Re)point every arena parameter's ``.grad`` at its view."""
        for p, v in zip(self.params, self.views):
            if p.grad is not v:
                p.grad = v

    def attached(self) -> bool:
        return all(p.grad is v for p, v in zip(self.params, self.views))

    def zero_grad(self) -> None:
        """Arena gradients <- 0 in place (pointers unchanged); other parameters' grads <- None."""
        for p in self.others:
            p.grad = None
        for b in self.buffers:
            b.zero_()
        self.attach()  # in case someone set a grad to None or replaced it

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)
