"""Embedded synthetic MSA data: a deterministic generator in the MMSA format.

Generative story (every number below is a knob of :class:`SynthSpec`):

1. Each segment ``i`` has three independent latent sentiment cues ``z_t, z_a, z_v ~ N(0, 1)``:
   what is said (lexical), how it is said (prosody) and what the face shows.
2. The label depends on all three, text most (``imbalance``):
   ``y* = imbalance·z_t + z_a + z_v + interaction·z_a·z_v + N(0, label_noise²)``, scaled so that
   ``std(y*) = 1.3``, clipped to [-3, 3] and rounded to multiples of 0.2 (five annotators'
   mean, like CMU-MOSI; exact zeros occur).
3. **Text** (dominant, easy): each of ``L_t`` tokens is ``z_t·u_t + N(0, text_noise²)`` with a
   fixed direction ``u_t``, plus a per-segment random *identity code* of norm ``text_memo``
   repeated on every token. The code carries no label information, but a model with enough
   capacity can memorise training labels through it: text alone can drive the *training*
   loss down (the greedy-learning trap of docs/method.md §8).
   **Memorisation shortcut** (``text_shortcut``): in the *training* split only, text also
   carries ``text_shortcut · s_i · u_s`` where ``s_i`` is the standardised part of the label
   that text cannot know (``z_a + z_v + interaction·z_a·z_v``); held-out splits carry the same
   direction with pure noise. It emulates a high-capacity pre-trained text encoder that
   memorises the training labels: text alone can fit the training set, the weak modalities'
   gradients fade, and held-out accuracy is left on the table unless training stays balanced.
4. **Audio / vision** (weak, complementary): only a random ``cue_frac`` of the ``L_a``/``L_v``
   valid frames carry ``z_a·u_a`` (resp. ``z_v·u_v``) under heavy noise ``av_noise``; the rest is
   noise. They hold the part of the label text cannot explain, but it takes temporal
   aggregation (attention/mean pooling) to read it.
   **Slow audio** (``audio_xor``, the second imbalance family): audio is weak because it is *slow
   to learn*, not because text offers a shortcut. A random fraction ``audio_xor`` of the segments
   draws a key ``k_i = ±1`` (fair coin; the others have ``k_i = +1``); the cue frames of audio carry
   ``k_i·z_a·u_a + k_i·u_k`` (``u_k`` a second fixed direction, orthogonal to ``u_a``). The
   information is all there (``z_a`` = the product of the two projections, frame by frame), but at
   ``audio_xor = 1`` no *linear* read-out of audio, pooled or not, correlates with the label: the
   encoder must fit a multiplicative (XOR-like) code, whose gradient starts near zero from a small
   initialisation (the parity plateau), so a model learns audio many steps later than vision.
   Values in between keep a linear part of weight ``1 - audio_xor``. 0 (default) leaves the data
   byte-identical (the key uses its own random stream).
5. Lengths vary per segment (uniform in ``[min_len, max_len]`` per modality); sequences are
   back-padded with zeros; lengths are stored as ``text_lengths``/``audio_lengths``/``vision_lengths``.

Default sizes follow CMU-MOSI's standard folds: 1284 / 229 / 686 segments.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CPSLError
from ..limits import gib, limit

from .mmsa import MMSAData, Split


@dataclass
class SynthSpec:
    seed: int = 0
    n_train: int = 1284
    n_valid: int = 229
    n_test: int = 686
    d_text: int = 64
    d_audio: int = 16
    d_vision: int = 20
    text_len: tuple = (8, 40)       # (min, max) valid steps
    audio_len: tuple = (16, 50)
    vision_len: tuple = (16, 50)
    imbalance: float = 1.6          # weight of z_t relative to z_a, z_v in the label
    interaction: float = 0.3        # weight of the z_a·z_v term (needs both weak modalities)
    label_noise: float = 0.25
    text_noise: float = 0.5         # per-token noise of text
    text_memo: float = 3.0          # norm of the per-segment identity code in text (memorisation capacity)
    text_shortcut: float = 0.0      # train-only text copy of the audio/visual label part (0 = off)
    av_noise: float = 1.0           # per-frame noise of audio/visual
    cue_frac: float = 0.3           # fraction of audio/visual frames that carry the cue
    cue_gain: float = 1.0           # amplitude of the audio/visual cue
    audio_xor: float = 0.0          # fraction of segments whose audio cue is sign-keyed (slow to learn; 0 = off)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise :class:`CPSLError` naming the first knob that would give an unusable dataset (or one whose
        arrays exceed ``CPSL_MAX_ARRAY_BYTES``, checked before anything is generated)."""
        check_seed(self.seed, "synthetic")
        for k in ("n_train", "n_valid"):
            if int(getattr(self, k)) < 2:
                raise CPSLError(f"synthetic knob {k} must be >= 2 (a split training or selecting on), "
                                f"got {getattr(self, k)}")
        if int(self.n_test) < 0:
            raise CPSLError(f"synthetic knob n_test must be >= 0, got {self.n_test}")
        for k in ("d_text", "d_audio", "d_vision"):
            if int(getattr(self, k)) < 1:
                raise CPSLError(f"synthetic knob {k} must be >= 1, got {getattr(self, k)}")
        for k in ("text_len", "audio_len", "vision_len"):
            v = getattr(self, k)
            if len(v) != 2 or not 1 <= int(v[0]) <= int(v[1]):
                raise CPSLError(f"synthetic knob {k} must be two integers 1 <= min <= max, got {v!r}")
        cap = limit("CPSL_MAX_ARRAY_BYTES")
        for m in ("text", "audio", "vision"):
            need = 4 * max(int(self.n_train), int(self.n_valid), int(self.n_test)) * int(getattr(self, f"{m}_len")[1]) \
                * int(getattr(self, f"d_{m}"))
            if need > cap:
                raise CPSLError(f"synthetic {m} features (sizes x {m}_len x d_{m}) need {gib(need)}, beyond the limit "
                                f"CPSL_MAX_ARRAY_BYTES={gib(cap)} (set the environment variable to allow more)")
        for k in ("imbalance", "interaction", "label_noise", "text_noise", "text_memo", "text_shortcut",
                  "av_noise", "cue_frac", "cue_gain", "audio_xor"):
            v = float(getattr(self, k))
            if not math.isfinite(v) or v < 0:
                raise CPSLError(f"synthetic knob {k} must be a finite number >= 0, got {v}")
        for k in ("cue_frac", "audio_xor"):
            if float(getattr(self, k)) > 1:
                raise CPSLError(f"synthetic knob {k} must be in [0, 1], got {getattr(self, k)}")


def check_seed(seed, family: str) -> None:
    """A generator seed must be an integer in [0, 2**32 - 1] (numpy's seed range); else CPSLError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise CPSLError(f"{family} seed must be an integer in [0, {2**32 - 1}], got {seed!r}")


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    u = rng.standard_normal(d).astype(np.float32)
    return u / np.linalg.norm(u)


def _sequences(rng, n, d, lens, per_step_signal, noise):
    """(n, L, d) back-padded: signal rows (n, L, d) broadcast + noise on valid steps."""
    L = int(lens.max()) if n else 1
    x = per_step_signal[:, :L] + noise * rng.standard_normal((n, L, d)).astype(np.float32)
    valid = np.arange(L)[None, :] < lens[:, None]
    x *= valid[:, :, None]
    return x.astype(np.float32)


def _keyed(sig: np.ndarray, carry: np.ndarray, u_a: np.ndarray, spec: SynthSpec, si: int, n: int) -> np.ndarray:
    """The slow-audio code (``audio_xor``): ``sig`` (n, L, d_audio) times a per-segment key
    ``k_i = ±1``, plus ``k_i·u_k`` on the cue frames. Its own random stream (split ``si``), so the
    rest of the data does not move."""
    krng = np.random.default_rng([spec.seed, si + 1, 0x51])
    u_k = np.random.default_rng([spec.seed, 0, 0x51]).standard_normal(u_a.shape[0])
    u_k = u_k - (u_k @ u_a) * u_a                            # orthogonal to the cue direction (unit)
    u_k = (u_k / np.linalg.norm(u_k)).astype(np.float32)
    flip = (krng.random(n) < spec.audio_xor) & (krng.random(n) < 0.5)
    key = np.where(flip, -1.0, 1.0).astype(np.float32)[:, None, None]     # (n, 1, 1)
    return key * (sig + 3.0 * spec.cue_gain * carry[:, :, None] * u_k[None, None, :])


def generate(spec: SynthSpec | None = None, **overrides) -> MMSAData:
    """Generate the three splits deterministically from ``spec.seed``."""
    spec = spec or SynthSpec()
    for k, v in overrides.items():
        if not hasattr(spec, k):
            raise ValueError(f"unknown synthetic knob {k!r}")
        setattr(spec, k, v)
    spec.check()
    root = np.random.default_rng(spec.seed)
    u_t, u_a, u_v = _unit(root, spec.d_text), _unit(root, spec.d_audio), _unit(root, spec.d_vision)
    u_s = _unit(root, spec.d_text)
    # Label scale fixed on a large draw so every split shares one mapping.
    zz = root.standard_normal((3, 100_000))
    ref = spec.imbalance * zz[0] + zz[1] + zz[2] + spec.interaction * zz[1] * zz[2]
    scale = 1.3 / np.sqrt(ref.var() + spec.label_noise ** 2)

    splits = {}
    for si, (name, n) in enumerate((("train", spec.n_train), ("valid", spec.n_valid), ("test", spec.n_test))):
        rng = np.random.default_rng([spec.seed, si + 1])
        z = rng.standard_normal((3, n)).astype(np.float32)
        y = spec.imbalance * z[0] + z[1] + z[2] + spec.interaction * z[1] * z[2]
        y = y + spec.label_noise * rng.standard_normal(n)
        y = np.clip(np.round(scale * y * 5.0) / 5.0, -3.0, 3.0).astype(np.float32)

        lt = rng.integers(spec.text_len[0], spec.text_len[1] + 1, n)
        la = rng.integers(spec.audio_len[0], spec.audio_len[1] + 1, n)
        lv = rng.integers(spec.vision_len[0], spec.vision_len[1] + 1, n)

        Lt = int(spec.text_len[1])
        code = rng.standard_normal((n, spec.d_text)).astype(np.float32)
        code *= spec.text_memo / np.linalg.norm(code, axis=1, keepdims=True)
        av = z[1] + z[2] + spec.interaction * z[1] * z[2]
        av = av / np.sqrt(2.0 + spec.interaction ** 2)
        noise_s = rng.standard_normal(n).astype(np.float32)
        s_i = av if name == "train" else noise_s
        sig_t = (z[0][:, None, None] * u_t[None, None, :] + code[:, None, :]
                 + spec.text_shortcut * s_i[:, None, None] * u_s[None, None, :]) * np.ones((1, Lt, 1), np.float32)
        text = _sequences(rng, n, spec.d_text, lt, sig_t.astype(np.float32), spec.text_noise)

        feats = {"text": text}
        lens = {"text": lt.astype(np.int64)}
        for mod, zi, u, lm, d in (("audio", 1, u_a, la, spec.d_audio), ("vision", 2, u_v, lv, spec.d_vision)):
            Lm = int(getattr(spec, f"{mod}_len")[1])
            carry = (rng.random((n, Lm)) < spec.cue_frac).astype(np.float32)
            sig = spec.cue_gain * z[zi][:, None, None] * carry[:, :, None] * u[None, None, :] * 3.0
            if mod == "audio" and spec.audio_xor > 0:
                sig = _keyed(sig, carry, u, spec, si, n)
            feats[mod] = _sequences(rng, n, d, lm, sig.astype(np.float32), spec.av_noise)
            lens[mod] = lm.astype(np.int64)
        ids = np.array([f"synth{spec.seed}_{name}$_${i:05d}" for i in range(n)])
        raw_text = np.array([f"synthetic segment {i}" for i in range(n)])
        splits[name] = Split(name, feats, lens, y, ids, raw_text)
    return MMSAData(splits, ("text", "audio", "vision"), path="synth")
