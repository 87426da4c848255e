"""What a run ran on: the facts that let a result be compared across machines.

Small numeric differences between machines (CPU code generation, thread counts, XLA flags) move
training results; a report that names them says which of two runs differs in what.
"""
from __future__ import annotations

import os
import platform
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))   # what taskset / a container allows, not the box
    except (AttributeError, OSError):
        return None


def machine_facts() -> dict:
    """CPU model, cores (on the box and usable by this process), load, library versions, backend,
    devices and the XLA flags in force."""
    import jax
    import jaxlib
    import numpy as np

    devices = jax.devices()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def describe(facts: dict) -> str:
    """One line for a log: the facts a reader compares first."""
    cores = f"{facts['usable_cores']} of {facts['cores']} cores" if facts.get("usable_cores") else \
        f"{facts['cores']} cores"
    flags = facts["xla_flags"] or "none"
    return (f"{facts['cpu_model']}, {cores}, load {facts['load_average_1min']}; jax {facts['jax']} / jaxlib "
            f"{facts['jaxlib']} on {facts['devices']} ({facts['backend']}); XLA_FLAGS: {flags}")
