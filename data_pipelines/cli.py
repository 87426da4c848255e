"""`vllama-prepare-data`: build a dataset's ArrayRecord shards (TFDS layout) from its published files.

  vllama-prepare-data demo --data-dir DIR [--num-train 256 --num-test 64 --seed 0]
  vllama-prepare-data webvid2m --source DIR --data-dir DIR [--video-dir DIR]
  vllama-prepare-data cc595k --source DIR --data-dir DIR [--image-dir DIR]
  vllama-prepare-data cc_sbu_align --source DIR --data-dir DIR
  vllama-prepare-data llava_instruct150k --source DIR --data-dir DIR [--image-dir DIR]
  vllama-prepare-data videochat_instruct11k --source DIR --data-dir DIR [--video-dir DIR]
  vllama-prepare-data folder --media-dir DIR --data-dir DIR [--name my_videos]
      [--captions FILE.csv|FILE.jsonl] [--instructions FILE.json ...] [--require-audio]
      (your own videos / images; see data_pipelines/adapters/folder.py)
  vllama-prepare-data tokenizer --shards GLOB --out DIR [--vocab-size 1024]
  Any dataset but demo: --beam="PIPELINE_OPTIONS" writes through Apache Beam (data_pipelines/beam_shards.py).

Output: DIR/<dataset>/1.0.0/ (readable with `tfds.data_source(<dataset>, data_dir=DIR)` or grain;
a folder dataset, whose name is not registered, with `tfds.builder_from_directory(DIR/NAME/1.0.0)`),
with `<dataset>-<split>.report.json` listing skipped inputs. Rerunning an interrupted command
resumes it (finished shards are kept in DIR/<dataset>/work-1.0.0 until the build completes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import List, Optional

from data_pipelines import records, shards, synthetic
from data_pipelines.adapters.common import MediaOptions
from data_pipelines.audio import check_channels
from vllama_jax.cli_errors import UserError, entry_point

SOURCE_DIR_FLAGS = {
    "webvid2m": ("video_dir",),
    "cc595k": ("image_dir",),
    "cc_sbu_align": (),
    "llava_instruct150k": ("image_dir",),
    "videochat_instruct11k": ("video_dir",),
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="output root (TFDS data_dir)")
    parser.add_argument("--workers", type=int, default=max((os.cpu_count() or 1) - 1, 0),
                        help="decoding processes (0: decode in this process)")
    parser.add_argument("--examples-per-shard", type=int, default=None,
                        help=f"default {shards.DEFAULT_EXAMPLES_PER_SHARD}")
    parser.add_argument("--max-examples", type=int, default=None, help="first N items of each split only")
    parser.add_argument("--no-progress", action="store_true")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _clip_flags(parser: argparse.ArgumentParser, default_frames: int) -> None:
    parser.add_argument("--frames", type=_positive_int, default=None,
                        help=f"frames stored per video (default {default_frames}; the loader samples "
                             "config.data.num_frames of them)")
    parser.add_argument("--audio-clips", type=_positive_int, default=None,
                        help=f"2-second fbank clips stored per video (default {records.NUM_AUDIO_CLIPS}); "
                             "must equal the training config's data.num_audio_clips")


def _media_flags(parser: argparse.ArgumentParser) -> None:
    _clip_flags(parser, MediaOptions().num_frames)
    parser.add_argument("--short-side", type=_positive_int, default=None,
                        help="stored frame short side (default 256)")
    parser.add_argument("--frame-size", type=_positive_int, default=None,
                        help="store video frames scaled to NxN while decoding, as the original's decord "
                             "reader gives them (e.g. 224; replaces --short-side for videos)")
    parser.add_argument("--no-audio", action="store_true", help="store no fbank (audio_present=False)")
    parser.add_argument("--audio-channels", default=None, type=check_channels,
                        help="how a multichannel track is read: 'imagebind' (default, the original's: "
                             "all-channel mean removal, fbank of channel 0), 'mix', or a channel index; "
                             "stored in each record's meta")
    parser.add_argument("--beam", default=None, metavar="PIPELINE_OPTIONS",
                        help="write through the Apache Beam pipeline (pip install -e '.[beam]') with these "
                             "pipeline options, e.g. '--direct_num_workers=4 --direct_running_mode=multi_processing' "
                             "or '--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp' "
                             "(launch/README.md); '' runs Beam's DirectRunner in this process")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllama-prepare-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="dataset", required=True)
    demo = sub.add_parser("demo", help="synthetic audio-visual demo set")
    _common(demo)
    demo.add_argument("--num-train", type=int, default=256)
    demo.add_argument("--num-test", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--media-dir", default=None, help="where the mp4s go (default DATA_DIR/vllama_demo/media)")
    _clip_flags(demo, synthetic.MEDIA_OPTIONS.num_frames)
    tok = sub.add_parser("tokenizer", help="a small LLaMA-like BPE tokenizer trained on the shards' text "
                                           "(for tiny / demo configs: config.paths.tokenizer)")
    tok.add_argument("--shards", required=True, help="ArrayRecord shard glob whose captions / conversations to learn")
    tok.add_argument("--out", required=True, help="output directory (tokenizer.json + tokenizer_config.json)")
    tok.add_argument("--vocab-size", type=_positive_int, default=1024,
                     help="at most this many ids (default 1024, the tiny configs' config.model.vocab_size)")
    for name, flags in SOURCE_DIR_FLAGS.items():
        p = sub.add_parser(name, help=f"{name} from its published files")
        _common(p)
        _media_flags(p)
        p.add_argument("--source", required=True, help="directory with the published annotation files")
        for flag in flags:
            p.add_argument("--" + flag.replace("_", "-"), default=None)
    _folder_parser(sub)
    return parser


def _folder_parser(sub) -> None:
    p = sub.add_parser("folder", help="your own videos / images with captions and/or instruction conversations")
    _common(p)
    _media_flags(p)
    p.add_argument("--media-dir", required=True, help="the folder of videos / images (sub-folders included)")
    p.add_argument("--name", default="my_videos", type=_dataset_name,
                   help="dataset name: the output directory DATA_DIR/NAME and the shard files' prefix")
    p.add_argument("--captions", default=None,
                   help="CSV with a header holding path,caption (more columns go to meta) or JSONL objects "
                        "{'path', 'caption'}; paths relative to --media-dir")
    p.add_argument("--instructions", action="append", default=[], metavar="JSON",
                   help="LLaVA ({'image'|'video', 'conversations'}) or VideoChat ({'video', 'QA'}) conversation "
                        "list; repeat for several files")
    p.add_argument("--require-audio", action="store_true",
                   help="skip videos without a usable audio track (reason no_audio) instead of keeping them silent")
    p.add_argument("--ignore-unlabelled", action="store_true",
                   help="do not list media files that no caption / instruction names in the report")


def _dataset_name(name: str) -> str:
    from data_pipelines.adapters.folder import check_name

    try:
        return check_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _builder_kwargs(args) -> dict:
    kwargs = dict(num_workers=args.workers, examples_per_shard=args.examples_per_shard,
                  progress=not args.no_progress)
    changes = {k: v for k, v in (("num_frames", args.frames), ("num_audio_clips", args.audio_clips),
                                 ("short_side", getattr(args, "short_side", None))) if v is not None}
    if args.dataset == "demo":
        kwargs["source_dir"] = args.media_dir and os.path.abspath(args.media_dir)
        kwargs["source_kwargs"] = dict(num_train=args.num_train, num_test=args.num_test, seed=args.seed)
        kwargs["options"] = dataclasses.replace(synthetic.MEDIA_OPTIONS, **changes)
        return kwargs
    if args.frame_size is not None:
        changes["frame_size"] = args.frame_size
    if args.no_audio:
        changes["audio"] = False
    if args.audio_channels is not None:
        changes["audio_channels"] = args.audio_channels
    if getattr(args, "require_audio", False):
        changes["require_audio"] = True
    kwargs["options"] = dataclasses.replace(MediaOptions(), **changes)
    if args.beam is not None:
        kwargs["beam_args"] = shlex.split(args.beam)
    if args.dataset == "folder":
        if not os.path.isdir(args.media_dir):
            raise UserError(f"--media-dir {args.media_dir!r} is not a directory (it should hold your videos / images)")
        kwargs["source_dir"] = os.path.abspath(args.media_dir)
        kwargs["source_kwargs"] = dict(captions=args.captions, instructions=list(args.instructions),
                                       list_unlabelled=not args.ignore_unlabelled)
        return kwargs
    if not os.path.isdir(args.source):
        raise UserError(f"--source {args.source!r} is not a directory (it should hold the published "
                        f"annotation files of {args.dataset})")
    kwargs["source_dir"] = os.path.abspath(args.source)
    kwargs["source_kwargs"] = {f: getattr(args, f) for f in SOURCE_DIR_FLAGS[args.dataset] if getattr(args, f)}
    return kwargs


def summary_line(name: str, split: str, report: dict, report_path: str, top: int = 3) -> str:
    """One line per split: what was written, what was skipped and why (most frequent reasons
    first), and the report file that lists every skipped item with its path and error."""
    line = f"{name}/{split}: wrote {report['num_written']} of {report['num_inputs']} items"
    if report["num_skipped"]:
        reasons = sorted(report["skipped_by_category"].items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{k} {v}" for k, v in reasons[:top])
        rest = len(reasons) - top
        more = f", {rest} more reason{'s' * (rest > 1)}" if rest > 0 else ""
        line += f"; skipped {report['num_skipped']} ({shown}{more}); each skipped item and why: {report_path}"
    return line


def _shard_texts(pattern: str):
    from data_pipelines.loader import ShardSource

    source = ShardSource([pattern])
    for i in range(len(source)):
        ex = source[i]
        if ex.get("caption"):
            yield ex["caption"]
        for turn in ex.get("conversations") or ():
            yield turn["value"]


def _tokenizer(args) -> int:
    from data_pipelines.tokenizer import TextEncoder, build_demo_tokenizer, load_tokenizer

    from vllama_jax.train.config_lib import VICUNA_TEMPLATE
    # The prompt template and end symbol are text the model reads too.
    texts = list(_shard_texts(args.shards)) + [VICUNA_TEMPLATE.format("Describe this."), "###"]
    out = build_demo_tokenizer(texts, os.path.abspath(args.out), vocab_size=args.vocab_size)
    n = len(TextEncoder(load_tokenizer(out)).tokenizer)
    print(json.dumps({"tokenizer": os.fspath(out), "texts": len(texts), "vocab_size": n - 1,
                      "with_image_patch_token": n}, indent=1))
    return 0


@entry_point("vllama-prepare-data")
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset == "tokenizer":
        return _tokenizer(args)
    from data_pipelines import tfds_builders

    name = {"demo": synthetic.NAME, "folder": getattr(args, "name", "")}.get(args.dataset, args.dataset)
    kwargs = _builder_kwargs(args)
    builder_class = tfds_builders.folder_builder(name) if args.dataset == "folder" else tfds_builders.BUILDERS[name]
    builder = builder_class(data_dir=os.path.abspath(args.data_dir), **kwargs)
    import tensorflow_datasets as tfds

    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=kwargs.get("source_dir"), max_examples_per_split=args.max_examples))
    except ValueError as e:   # the adapters' errors about the published files (bad csv / json)
        raise UserError(str(e)) from e
    summary = {}
    for split in builder.info.splits:
        report_path = os.path.join(builder.data_dir, shards.report_filename(name, split))
        with open(report_path) as f:
            report = json.load(f)
        print(summary_line(name, split, report, report_path))
        summary[split] = {k: report[k] for k in ("num_inputs", "num_written", "num_skipped",
                                                 "skipped_by_category", "num_no_audio")}
    print(json.dumps({"dataset": name, "dir": os.fspath(builder.data_dir), "splits": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
