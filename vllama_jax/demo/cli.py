"""`vllama-demo`: the command line of the demo (vllama_jax/demo/recipe.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vllama_jax.cli_errors import entry_point


def _demo_parser() -> argparse.ArgumentParser:
    from vllama_jax.demo import recipe

    p = argparse.ArgumentParser(prog="vllama-demo", description=recipe.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="./vllama_demo_run", help="where data, towers, runs and reports go")
    p.add_argument("--seed", type=int, default=0, help="every random choice follows from it")
    p.add_argument("--quick", action="store_true", help="a tiny, fast variant (every phase, no accuracy target)")
    p.add_argument("--skip-data", action="store_true", help="reuse the workdir's shards when they exist")
    p.add_argument("--workers", type=int, default=None, help="data-writer processes (default: cores - 1)")
    p.add_argument("--from-phase", choices=recipe.RESUMABLE, default=None,
                   help="rerun from this phase on the data, tokenizer, towers and earlier runs an earlier "
                        "run left in --workdir (same --seed); for recipe experiments")
    return p


@entry_point("vllama-demo")
def demo_main(argv: Sequence[str] | None = None) -> int:
    """`vllama-demo`: the whole recipe in miniature (see vllama_jax/demo/recipe.py)."""
    args = _demo_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.workers is not None and args.workers < 0:
        print("vllama-demo: --workers must be >= 0", file=sys.stderr)
        return 2
    from vllama_jax.demo.recipe import run_demo

    run_demo(args.workdir, seed=args.seed, quick=args.quick, skip_data=args.skip_data, workers=args.workers,
             from_phase=args.from_phase)
    return 0


if __name__ == "__main__":
    sys.exit(demo_main())
