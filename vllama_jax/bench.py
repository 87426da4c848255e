"""`vllama-bench`: the benchmarks (benchmarks/run.py) from any directory."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from vllama_jax.cli_errors import UserError, entry_point

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@entry_point("vllama-bench")
def bench_main(argv: Sequence[str] | None = None) -> int:
    """`vllama-bench [args]`: `python -m benchmarks.run [args]` from any directory (the benchmarks
    live in the source checkout, next to the package, not in the installed package)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not os.path.isfile(os.path.join(REPO, "benchmarks", "run.py")):
        raise UserError(f"no benchmarks/ next to the package in {REPO}: the benchmarks run from a source "
                        "checkout installed with `pip install -e .`")
    # --json paths are the caller's, relative to where it was called from.
    for i, a in enumerate(argv):
        if a.startswith("--json="):
            argv[i] = "--json=" + os.path.abspath(a[len("--json="):])
        elif i and argv[i - 1] == "--json":
            argv[i] = os.path.abspath(a)
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *argv], cwd=REPO)
