"""The ``unimodal_bias`` family: the regression benchmark of deep linear multimodal networks in
which joint training provably under-learns a modality.

Source: Zhang, Latham & Saxe, "Understanding Unimodal Bias in Multimodal Deep Linear Networks",
ICML 2024 (arXiv 2312.00935). Late-fusion linear networks trained from a small initialisation
learn the higher-variance modality first (the *unimodal phase*, longer with the variance ratio
and the fusion depth); with fewer training samples than input dimensions and label noise, the
phase leaves a lasting bias and a generalisation deficit against early fusion; with many samples
the deficit vanishes. Written from the paper's setting, not from its code.

Generative story (every number is a knob of :class:`UnimodalBiasSpec`):

* ``M`` = 2 or 3 modalities of ``dims`` features each. Features are Gaussian with variance
  ``variances[m]`` per dimension; ``rho`` is the correlation of feature ``j`` of one modality with
  feature ``j`` of another (the shared dimensions), 0 by default (independent modalities).
* Label ``y = Σ_m w_m · x_m + N(0, noise²)`` with ``weights``: ``const`` (every entry 0.1, the
  paper's choice) or ``uniform`` (entries drawn once per dataset seed from U(−0.2, 0.2)).
* ``variant = xor``: the *last* modality is non-linear: its term is ``xor_gain · x_B[0] · x_B[1] /
  √(v_B[0] v_B[1])`` (an XOR-like product, uncorrelated with every linear read-out of ``x_B``)
  instead of ``w_B · x_B``; a linear network cannot use it, a ReLU network can.

Stored in the MMSA format, one step per segment (``(N, 1, d)`` per modality, lengths 1):
modality A (``variances[0]``) is ``text``, B is ``audio``, a third is ``vision``. Labels are
not rounded or clipped (a regression benchmark, not sentiment): the file's top-level
``meta = {"labels": "unbounded"}`` tells cpsl's reader to accept labels outside MMSA's [-3, 3].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CPSLError
from ..limits import gib, limit
from .mmsa import MMSAData, Split
from .synthetic import check_seed

NAMES = ("text", "audio", "vision")


@dataclass
class UnimodalBiasSpec:
    seed: int = 0
    n_train: int = 70
    n_valid: int = 200
    n_test: int = 2000
    dims: tuple = (50, 50)          # features per modality (2 or 3 modalities)
    variances: tuple = (3.0, 1.0)   # per-dimension variance of each modality
    rho: float = 0.0                # correlation of feature j across modalities
    weights: str = "const"          # const (0.1 everywhere) or uniform (U(-0.2, 0.2), per seed)
    noise: float = 0.5              # label noise std
    variant: str = "linear"         # linear, or xor (the last modality's term is a product)
    xor_gain: float = 1.0           # scale of the xor term

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise :class:`CPSLError` naming the first knob that would give an unusable dataset."""
        for k, lo in (("n_train", 2), ("n_valid", 2), ("n_test", 0)):
            if int(getattr(self, k)) < lo:
                raise CPSLError(f"unimodal_bias knob {k} must be >= {lo}, got {getattr(self, k)}")
        check_seed(self.seed, "unimodal_bias")
        m = len(self.dims)
        if m not in (2, 3) or any(int(d) < 1 for d in self.dims):
            raise CPSLError(f"unimodal_bias knob dims must be 2 or 3 sizes >= 1, got {self.dims!r}")
        need = 8 * max(int(self.n_train), int(self.n_valid), int(self.n_test)) * max(int(d) for d in self.dims)
        cap = limit("CPSL_MAX_ARRAY_BYTES")
        if need > cap:     # the float64 draws of the largest split's widest modality
            raise CPSLError(f"unimodal_bias features (split size x dims) need {gib(need)}, beyond the limit "
                            f"CPSL_MAX_ARRAY_BYTES={gib(cap)} (set the environment variable to allow more)")
        if len(self.variances) != m or any(not math.isfinite(v) or v <= 0 for v in self.variances):
            raise CPSLError(f"unimodal_bias knob variances must be {m} numbers > 0 (one per modality), "
                            f"got {self.variances!r}")
        if not -1.0 < float(self.rho) < 1.0:
            raise CPSLError(f"unimodal_bias knob rho must be in (-1, 1), got {self.rho}")
        if m == 3 and float(self.rho) < -0.5:
            raise CPSLError(f"unimodal_bias knob rho must be >= -0.5 with 3 modalities, got {self.rho}")
        for k in ("noise", "xor_gain"):
            v = float(getattr(self, k))
            if not math.isfinite(v) or v < 0:
                raise CPSLError(f"unimodal_bias knob {k} must be a finite number >= 0, got {v}")
        if self.weights not in ("const", "uniform"):
            raise CPSLError(f"unimodal_bias knob weights must be const or uniform, got {self.weights!r}")
        if self.variant not in ("linear", "xor"):
            raise CPSLError(f"unimodal_bias knob variant must be linear or xor, got {self.variant!r}")
        if self.variant == "xor" and int(self.dims[-1]) < 2:
            raise CPSLError("unimodal_bias variant xor needs the last modality to have >= 2 dims")


def _features(rng, n: int, spec: UnimodalBiasSpec) -> list[np.ndarray]:
    """Per modality (n, d_m): N(0, v_m) per dimension; feature j of every modality shares a
    common factor so that corr(x_m[j], x_k[j]) = rho (for j below every modality's size)."""
    dims = [int(d) for d in spec.dims]
    out = []
    common = rng.standard_normal((n, max(dims)))
    r = float(spec.rho)
    for d, v in zip(dims, spec.variances):
        own = rng.standard_normal((n, d))
        if r >= 0:
            z = math.sqrt(r) * common[:, :d] + math.sqrt(1.0 - r) * own
        else:   # two or three modalities with a negative correlation: alternate the factor's sign
            sign = 1.0 if not out else -1.0
            z = sign * math.sqrt(-r) * common[:, :d] + math.sqrt(1.0 + r) * own
        out.append((math.sqrt(float(v)) * z).astype(np.float32))
    return out


def label_weights(spec: UnimodalBiasSpec) -> list[np.ndarray]:
    """The linear label weights ``w_m`` of each modality (the xor modality's are unused)."""
    rng = np.random.default_rng([int(spec.seed), 0x0B1A5])
    return [np.full(int(d), 0.1) if spec.weights == "const" else rng.uniform(-0.2, 0.2, int(d))
            for d in spec.dims]


def generate(spec: UnimodalBiasSpec | None = None) -> MMSAData:
    """The three splits, deterministic in ``spec.seed``."""
    spec = spec or UnimodalBiasSpec()
    spec.check()
    w = label_weights(spec)
    names = NAMES[:len(spec.dims)]
    splits = {}
    for si, (name, n) in enumerate((("train", spec.n_train), ("valid", spec.n_valid), ("test", spec.n_test))):
        rng = np.random.default_rng([int(spec.seed), si + 1, 0x0B1A5])
        xs = _features(rng, int(n), spec)
        y = np.zeros(int(n))
        for i, (x, wm) in enumerate(zip(xs, w)):
            if spec.variant == "xor" and i == len(xs) - 1:
                v = float(spec.variances[i])
                y += float(spec.xor_gain) * x[:, 0].astype(np.float64) * x[:, 1] / v
            else:
                y += x.astype(np.float64) @ wm
        y += float(spec.noise) * rng.standard_normal(int(n))
        feats = {m: x[:, None, :] for m, x in zip(names, xs)}
        lens = {m: np.ones(int(n), np.int64) for m in names}
        ids = np.array([f"ub{spec.seed}_{name}$_${i:06d}" for i in range(int(n))])
        raw = np.array([f"unimodal_bias segment {i}" for i in range(int(n))])
        splits[name] = Split(name, feats, lens, y.astype(np.float32), ids, raw)
    return MMSAData(splits, names, path="synth", meta={"labels": "unbounded", "family": "unimodal_bias"})


def effective_dims(spec: UnimodalBiasSpec) -> int:
    """D = Σ dims: the theory's overparameterisation ratio is n_train / D."""
    return sum(int(d) for d in spec.dims)
