"""Training metrics on the host: window summaries, throughput, stdout/tqdm and TensorBoard.

The train step returns its metrics as device scalars; the loop keeps them un-fetched and pulls
a whole window at once every `log_every` steps, so logging costs one host sync per window.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from vllama_jax import progress
from vllama_jax.progress import progress_bar


def summarize(window: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One dict from a window of per-step metric dicts: counts (`num_*`) summed, `lr` last,
    everything else averaged."""
    if not window:
        return {}
    out = {}
    for k in window[0]:
        vals = np.asarray([float(m[k]) for m in window], np.float64)
        if k.startswith("num_"):
            out[k] = float(vals.sum())
        elif k == "lr":
            out[k] = float(vals[-1])
        else:
            out[k] = float(vals.mean())
    return out


def first_nonfinite(window: Sequence[Mapping[str, Any]], keys=("loss", "grad_norm")) -> int | None:
    """Index of the first step in the window whose loss or grad norm is NaN/inf."""
    for i, m in enumerate(window):
        if any(k in m and not math.isfinite(float(m[k])) for k in keys):
            return i
    return None


class Throughput:
    """Examples/s and tokens/s over the wall time since the previous call."""

    def __init__(self):
        self._t = time.perf_counter()

    def reset(self):
        self._t = time.perf_counter()

    def rates(self, num_examples: float, num_tokens: float | None) -> dict[str, float]:
        now = time.perf_counter()
        dt, self._t = max(now - self._t, 1e-9), now
        out = {"examples_per_s": num_examples / dt}
        if num_tokens is not None:
            out["tokens_per_s"] = num_tokens / dt
        return out


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4f}"
    return f"{v:.3e}"


class MetricsLogger:
    """A tqdm progress bar over the train steps, log lines, and TensorBoard scalars.

    Only process 0 writes; the others stay silent.
    """

    def __init__(self, logdir: str | None, *, total_steps: int, start_step: int = 0,
                 progress: bool = True, stream=None, desc: str = ""):
        self.enabled = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self.bar = progress_bar(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step",
                                desc=desc, disable=not (self.enabled and progress), file=self.stream)
        self.writer = None
        if self.enabled and logdir:
            from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
            if "://" not in logdir:   # gs:// logdirs are written by tensorboardX's GCS writer
                os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(logdir=logdir)

    def advance(self, n: int = 1):
        self.bar.update(n)

    def write(self, line: str):
        if self.enabled:
            progress.write(line, file=self.stream)

    def log(self, step: int, scalars: Mapping[str, float], prefix: str = "train"):
        if not self.enabled:
            return
        self.write(f"[{prefix}] step {step}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in scalars.items()))
        if prefix == "train":
            self.bar.set_postfix({k: _fmt(scalars[k]) for k in ("loss", "lr") if k in scalars},
                                 refresh=False)
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def close(self):
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def mean_over_batches(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Eval summary: per-batch means averaged with equal weight, counts summed."""
    results = list(results)
    if not results:
        raise ValueError("the eval iterator yielded no batches")
    out = summarize(results)
    out["num_batches"] = float(len(results))
    return out
