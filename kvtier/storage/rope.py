"""RoPE on stored keys, undone and redone: keys quantized before their rotary embedding (KVQuant).

llama.cpp stores keys after RoPE: channel pairs ``(2i, 2i + 1)`` of each head (``LLAMA_ROPE_TYPE_NORM``,
the llama architecture's pairing; NEOX pairs ``(i, i + d/2)``) rotated by ``pos * base^(-2i/n_rot)``.
The rotation varies each pair's channels along the tokens of a block, which widens the
per-channel groups that keys are quantized in. Rotating by ``-pos`` before quantizing and by
``+pos`` after decoding gives the same keys back (to f16 rounding: measured exact for 99.9996% of
the default model's key values, off by at most 2 ULPs for the rest) with ~15% less quantization
error per channel on the default model (docs/quantization.md has the measurements).

Only the plain rotation is modelled: no YaRN or linear scaling (``freq_scale`` 1), all channels
rotated (``n_rot`` = head dim). Other models keep post-RoPE keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROPE_NORM = 0
"""llama.cpp's ``LLAMA_ROPE_TYPE_NORM``: adjacent channel pairs, the only type handled here."""


@dataclass(frozen=True, slots=True)
class Rope:
    """The rotary embedding of a model's keys: what re-applying it needs."""

    freq_base: float
    head_dim: int

    def angles(self, positions: np.ndarray) -> np.ndarray:
        """Rotation angles (float64, shape (tokens, head_dim / 2)) at ``positions``."""
        inv = self.freq_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64)
                                 / self.head_dim)
        return np.asarray(positions, np.float64)[:, None] * inv[None, :]


def rotate(x: np.ndarray, rope: Rope, positions: np.ndarray, inverse: bool = False
           ) -> np.ndarray:
    """Keys ``x`` (tokens, heads x head_dim; any float dtype) rotated by RoPE at ``positions``
    (or back, ``inverse``), as float32: the numpy reference of the codec's kernels."""
    n, width = x.shape
    d = rope.head_dim
    if width % d or d % 2:
        raise ValueError(f"rows of {width} values are not whole heads of {d}")
    h = np.asarray(x, np.float64).reshape(n, width // d, d // 2, 2)
    ang = rope.angles(positions)
    c = np.cos(ang)[:, None, :]
    s = np.sin(ang)[:, None, :]
    if inverse:
        s = -s
    a, b = h[..., 0], h[..., 1]
    return np.stack([a * c - b * s, a * s + b * c], -1).reshape(n, width).astype(np.float32)
