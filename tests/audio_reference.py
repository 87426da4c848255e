"""Torch restatements of the reference's audio ops, shared by the audio parity tests and
`benchmarks/media_decode.py` (which times the original path): torchaudio is not installed here."""
import math

import torch


def torchaudio_resample(wav: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """torchaudio.functional.resample (sinc_interp_hann, width 6, rolloff 0.99) of float32
    [channels, samples], from torch ops."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    base = min(orig, new) * 0.99
    width = math.ceil(6 * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float32)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float32)[:, None, None] / new + idx
    t = (t * base).clamp(-6, 6)
    window = torch.cos(t * math.pi / 6 / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.tensor(1.0), t.sin() / t) * window * (base / orig)
    length = wav.shape[-1]
    x = torch.nn.functional.pad(wav[:, None], (width, width + orig))
    out = torch.nn.functional.conv1d(x, kernel, stride=orig).transpose(1, 2).reshape(wav.shape[0], -1)
    return out[:, : math.ceil(new * length / orig)]
