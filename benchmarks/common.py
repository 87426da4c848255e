"""What every benchmark does around its measurement: note the machine's load, print the result,
write it to `--json`.

Imported inside functions (`from benchmarks.common import ...`), as the benchmarks import one
another, so `python benchmarks/x.py` works once `__main__` has put the repo on sys.path.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Callable, Iterable


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def uptime() -> str:
    """`uptime`'s line (load averages included), for a measurement's record."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def write_json(path: str | None, result: Any) -> None:
    """Writes `result` to `path` (a benchmark's `--json`), if one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def show(result: Any) -> None:
    print(json.dumps(result, indent=1), flush=True)


def measure_each(names: Iterable[str], measure: Callable[[str], Any], json_path: str | None) -> list:
    """`measure(name)` for each name, each result shown as it comes; the list written to json_path."""
    results = []
    for name in names:
        results.append(measure(name))
        show(results[-1])
    write_json(json_path, results)
    return results
