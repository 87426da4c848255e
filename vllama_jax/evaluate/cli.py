"""`vllama-eval`: answers for held-out shards (runner.py), scored (metrics.py), as a JSON report."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from data_pipelines import prompts
from vllama_jax.cli_errors import entry_point
from vllama_jax.evaluate.metrics import EvalError, format_summary
from vllama_jax.evaluate.runner import default_loader_config, run_eval, write_report


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllama-eval", description="Generate answers for held-out shards and score them.")
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="trainer workdir(s), a params .msgpack file or a `vllama-convert import` directory")
    p.add_argument("--config", default=None,
                   help="trainer config file (configs/*.py; its prompt format and data.eval_shards are used) "
                        "or a VideoLlamaConfig preset for .msgpack")
    p.add_argument("--shards", nargs="+", default=None, help="ArrayRecord shard files or globs (default: "
                   "the trainer config's data.eval_shards)")
    p.add_argument("--out", default="eval_report.json", help="where the JSON report goes")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--conv-style", choices=prompts.CONV_STYLES, default=None)
    p.add_argument("--media", default="auto", help="'auto', or a comma list in placeholder order, e.g. audio,video")
    p.add_argument("--kinds", default="qa,caption", help="which items: qa, caption or both")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument("--bucket", type=int, default=32, help="prompt lengths are padded to a multiple of this "
                   "(fewer compiled programs)")
    return p.parse_args(list(argv))


@entry_point("vllama-eval")
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `vllama-eval`."""
    from data_pipelines.loader import LoaderError, loader_config_from
    from vllama_jax import config_loader
    from vllama_jax.inference import LoadError, load_for_inference

    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        train_config = None
        config = args.config
        if isinstance(config, str) and config_loader.split_spec(config)[0].endswith(".py"):
            loaded = config_loader.load_file(config)
            if hasattr(loaded, "data") and hasattr(loaded, "model"):
                train_config = config = loaded
        model = load_for_inference(args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0], config,
                                   tokenizer=args.tokenizer, step=args.step, conv_style=args.conv_style)
        lc = default_loader_config(model)
        if train_config is not None:
            lc = dataclasses.replace(loader_config_from(train_config, train=False), conv_style=model.conv_style)
        shards = args.shards or ([train_config.data.eval_shards] if train_config is not None
                                 and train_config.data.get("eval_shards") else None)
        if not shards:
            raise EvalError("no shards to evaluate: pass --shards (or set data.eval_shards in the trainer config)")
        media = None if args.media == "auto" else tuple(m.strip() for m in args.media.split(",") if m.strip())
        report = run_eval(model, shards, loader_config=lc, media=media, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, limit=args.limit, bucket=args.bucket,
                          kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()))
    except (LoadError, LoaderError, EvalError) as e:
        print(f"vllama-eval: {e}", file=sys.stderr)
        return 2
    report["settings"].update(checkpoint=args.checkpoint, shards=list(shards))
    write_report(report, args.out)
    print(format_summary(report))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
