"""`vllama-convert`: PyTorch / Hugging Face checkpoints <-> our orbax params checkpoints.

  vllama-convert import OUT --preset vicuna7b --llama ckpt/vicuna-7b \\
      --blip2 blip2_pretrained_flant5xxl.pth --imagebind imagebind_huge.pth \\
      --video-llama finetune-vicuna7b-v2.pth --video-llama finetune_vicuna7b_audiobranch.pth
  vllama-convert import OUT --update --video-llama new_heads.pth      # add/replace subtrees
  vllama-convert export OUT_OR_WORKDIR --video-llama heads.pth --branch video --hf llama_hf/
  vllama-convert inspect some_file.pth
  vllama-convert keys --out docs/CHECKPOINT_KEYS.md                       # the written key map

import reads any mix of: an HF LLaMA / Vicuna / Llama-2 / Llama-3 directory (`--llama`; its
config.json decides the LLaMA config), LAVIS `eva_vit_g.pth` (`--eva-vit`), a BLIP-2 `.pth`
(`--blip2`), `imagebind_huge.pth` (`--imagebind`) and released Video-LLaMA / MiniGPT-4 `.pth` files
(`--video-llama`, repeatable), and writes one params checkpoint (`vllama_jax.convert.params_checkpoint`)
in the `VideoLlama` params layout, with a manifest naming each subtree's source and every key the
importers ignored or could not place. Unplaced keys are printed (an error with `--strict`).

export reads a params checkpoint, a trainer workdir (latest or `--step`) or an orbax params
directory, and writes any of: the Video-LLaMA `.pth` layout (`--video-llama`, what the reference's
`ckpt` / `ckpt_2` options load), an HF LLaMA directory (`--hf`), a BLIP-2 `.pth` (`--blip2`),
`eva_vit_g.pth` (`--eva-vit`) and `imagebind_huge.pth` (`--imagebind`).

Files are read with `torch.load(weights_only=True)` or safetensors (nothing is unpickled blindly),
tensor by tensor with a progress bar; every output is written to a temporary sibling and renamed
into place, so a failure leaves the destination untouched. Exit status 0 on success, 2 on a bad
input (the message names the file and the key).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np

from vllama_jax import config_loader, tree_paths
from vllama_jax.convert import hf_llama, imagebind, lavis, params_checkpoint, video_llama
from vllama_jax.convert.common import (CheckpointError, ConversionReport, Entry, check_strict, export_entries,
                                       np_dtype, progress_bar, read_state_dict, save_state_dict)
from vllama_jax.cli_errors import UserError, entry_point
from vllama_jax.models.video_llama import VideoLlamaConfig

DTYPES = ("float32", "bfloat16", "float16")
TOWER_FILES = video_llama.TOWER_FILES
# What `guess_kind` can tell apart, for messages.
KINDS = {"video_llama": "a Video-LLaMA checkpoint", "blip2": "a BLIP-2 checkpoint",
         "eva_vit": "an EVA ViT (eva_vit_g.pth)", "imagebind": "an ImageBind checkpoint",
         "hf_llama": "an HF LLaMA state dict", "unknown": "an unknown model"}


class UsageError(ValueError):
    """The command line asks for something impossible (no inputs, a missing subtree...)."""


# ------------------------------------------------------------------------------------------ helpers

class _Ticking(Mapping):
    """A state dict that advances a progress bar once per distinct tensor a converter reads."""

    def __init__(self, sd: Mapping[str, np.ndarray], bar):
        self._sd, self._bar, self._seen = sd, bar, set()

    def __getitem__(self, key):
        value = self._sd[key]
        if key not in self._seen:
            self._seen.add(key)
            self._bar.update(1)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def __contains__(self, key) -> bool:
        return key in self._sd


@contextlib.contextmanager
def _reading(path, progress: bool, kind: str):
    """The state dict of `path`, ticking a progress bar per tensor read. A CheckpointError inside names
    the file and, when the keys look like another kind of checkpoint (`guess_kind`), says which."""
    sd = read_state_dict(path)
    bar = progress_bar(len(sd), f"{kind} {Path(path).name}", progress)
    try:
        yield _Ticking(sd, bar)
    except CheckpointError as e:
        msg = str(e) if str(path) in str(e) else f"{path}: {e}"
        looks = guess_kind(sd)
        if looks not in (kind, "unknown"):
            msg += f" (its keys look like {KINDS[looks]}, not {KINDS[kind]})"
        raise CheckpointError(msg) from None
    finally:
        bar.close()


def _model_config(preset: str | None, hf_llama_config=None, train_config: str | None = None) -> VideoLlamaConfig:
    """The model from a trainer config file (as `vllama-train` builds it) or a VideoLlamaConfig preset;
    an HF LLaMA config (directory or config.json dict), when given, sets the LLaMA architecture."""
    if train_config:
        from vllama_jax.train.video_llama_task import model_config
        config = model_config(config_loader.load_file(train_config))
    elif preset:
        config = VideoLlamaConfig.preset(preset)
    else:
        raise UsageError(f"--preset (one of {sorted(VideoLlamaConfig.presets())}) or --train-config is required")
    if hf_llama_config is not None:
        config = video_llama.with_hf_llama(config, hf_llama_config)
    return config


def _subtree_names(params: Mapping) -> list[str]:
    """Component-level names ('image_encoder/qformer', 'llama', ...) present in a params tree."""
    return [name for name, path in video_llama.PARAM_PATHS.items() if tree_paths.has(params, path)]


def _put(params: dict, path: tuple[str, ...], value, source: str, sources: dict, out) -> None:
    """Later sources replace earlier ones, as the reference's `ckpt_2` overrides its `ckpt`."""
    where = "/".join(path)
    if where in sources and sources[where]["source"] != source:
        print(f"note: {where} from {source} replaces the one from {sources[where]['source']}", file=out)
    tree_paths.set_in(params, path, value)


def _print_report(source: str, report: ConversionReport, out) -> None:
    print(f"{source}: {report.summary()}", file=out)


# ------------------------------------------------------------------------------------------ import

def _import_sources(args, config: VideoLlamaConfig, dtype, progress: bool, out
                    ) -> tuple[dict, dict, dict]:
    """(params, sources: component -> {source, kind}, reports: source -> report json)."""
    params: dict = {}
    sources: dict = {}
    reports: dict = {}

    def record(component_paths, source, kind, report: ConversionReport | None):
        for name in component_paths:
            sources["/".join(video_llama.PARAM_PATHS[name])] = {"source": source, "kind": kind}
        if report is not None:
            reports[source] = report.to_json()
            _print_report(source, report, out)
            check_strict(report, args.strict, source)

    if args.llama:
        # Lazy: each tensor is read from its shard only as save_params writes it (bounded host memory).
        _, llama = hf_llama.lazy_hf(args.llama, config=config.llama, dtype=dtype, strict=args.strict)
        _put(params, ("llama",), llama, str(args.llama), sources, out)
        record(["llama"], str(args.llama), "hf_llama", None)
        print(f"{args.llama}: loaded {len(hf_llama.key_map(config.llama))} tensors", file=out)
    if args.blip2:
        with _reading(args.blip2, progress, "blip2") as sd:
            enc, report = lavis.blip2_image_encoder_params_from_state_dict(sd, config.vit, config.image_qformer,
                                                                           dtype)
        for name, key in (("visual_encoder", "visual_encoder"), ("ln_vision", "ln_vision"),
                          ("image_qformer", "qformer")):
            _put(params, video_llama.PARAM_PATHS[name], enc[key], str(args.blip2), sources, out)
        record(["visual_encoder", "ln_vision", "image_qformer"], str(args.blip2), "blip2", report)
    if args.eva_vit:
        with _reading(args.eva_vit, progress, "eva_vit") as sd:
            vit, report = lavis.eva_vit_params_from_state_dict(sd, config.vit, "", dtype)
        _put(params, video_llama.PARAM_PATHS["visual_encoder"], vit, str(args.eva_vit), sources, out)
        record(["visual_encoder"], str(args.eva_vit), "eva_vit", report)
    if args.imagebind:
        if config.imagebind_audio is None and config.imagebind_vision is None:
            raise UsageError(f"--imagebind: preset {args.preset!r} has no audio branch")
        modalities = tuple(m for m, c in (("audio", config.imagebind_audio), ("vision", config.imagebind_vision))
                           if c is not None)
        tower_dtype = dtype if dtype is not None else (config.imagebind_audio or config.imagebind_vision).param_dtype
        with _reading(args.imagebind, progress, "imagebind") as sd:
            weights = imagebind.import_imagebind(sd, config.imagebind_audio, config.imagebind_vision, modalities,
                                                 tower_dtype)
        loaded = []
        for name, tower in (("audio_encoder", weights.audio), ("audio_vision_encoder", weights.vision)):
            if tower is not None:
                _put(params, video_llama.PARAM_PATHS[name], tower, str(args.imagebind), sources, out)
                loaded.append(name)
        keys = [e.key for n in loaded for e in video_llama.component_entries(config, n)]
        report = ConversionReport(tuple(k[len("audio_encoder."):] for k in keys),
                                  {k: "ImageBind modality Video-LLaMA does not use" for k in weights.ignored})
        record(loaded, str(args.imagebind), "imagebind", report)
    for path in args.video_llama or ():
        with _reading(path, progress, "video_llama") as sd:
            got, report = video_llama.params_from_state_dict(sd, config, None, dtype)
            found = video_llama.components_in(sd, config)
        for name in found:
            _put(params, video_llama.PARAM_PATHS[name], tree_paths.get(got, video_llama.PARAM_PATHS[name]), str(path),
                 sources, out)
        record(found, str(path), "video_llama", report)
    return params, sources, reports


def _merge(base: dict, update: Mapping) -> dict:
    """`base` with each component-level subtree of `update` replacing its counterpart."""
    out = dict(base)
    for name in _subtree_names(update):
        path = video_llama.PARAM_PATHS[name]
        out = tree_paths.replaced(out, path, tree_paths.get(update, path))
    return out


def cmd_import(args, out=sys.stdout) -> int:
    if not (args.llama or args.blip2 or args.eva_vit or args.imagebind or args.video_llama):
        raise UsageError("nothing to import: give --llama, --blip2, --eva-vit, --imagebind and/or --video-llama")
    dest = Path(args.out)
    base, meta = {}, {}
    if args.update:
        meta = params_checkpoint.read_manifest(dest) or {}
        if not meta:
            raise UsageError(f"--update: {dest} is not a params checkpoint")
        base = params_checkpoint.lazy_params(dest)   # the kept subtrees stream from the old copy
    elif dest.exists() and not args.overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not empty (pass --overwrite to replace it, or --update)")
    hf_config = args.llama or meta.get("llama_config")
    preset = args.preset or (None if args.train_config else meta.get("preset"))
    train_config = args.train_config or (None if args.preset else meta.get("train_config"))
    config = _model_config(preset, hf_config, train_config)
    dtype = np_dtype(args.dtype)
    params, sources, reports = _import_sources(args, config, dtype, not args.no_progress, out)
    params = _merge(base, params)
    manifest = {
        "preset": preset, "train_config": os.path.abspath(train_config) if train_config else None,
        "llama_config": hf_llama.config_to_hf(config.llama) if hf_config else None,
        "subtrees": {**meta.get("subtrees", {}), **sources},
        "reports": {**meta.get("reports", {}), **reports},
    }
    params_checkpoint.save_params(dest, params, manifest, overwrite=True)
    print(f"wrote {dest}: {', '.join(_subtree_names(params))}", file=out)
    return 0


# ------------------------------------------------------------------------------------------ export

def _tower_entries(config: VideoLlamaConfig, fmt: str) -> tuple[list[Entry], bool]:
    components, strip, wrap = TOWER_FILES[fmt]
    entries = []
    for name in components:
        if name not in video_llama.available_components(config):
            continue
        for e in video_llama.component_entries(config, name):
            entries.append(dataclasses.replace(e, key=e.key[len(strip):]))
    return entries, wrap


def _need(params: Mapping, components: Sequence[str], flag: str, where) -> None:
    missing = [c for c in components if not tree_paths.has(params, video_llama.PARAM_PATHS[c])]
    if missing:
        have = ", ".join(_subtree_names(params)) or "nothing"
        raise UsageError(f"{flag}: {where} has no {', '.join('/'.join(video_llama.PARAM_PATHS[c]) for c in missing)} "
                         f"(it holds: {have})")


def _export_components(args, config: VideoLlamaConfig) -> tuple[str, ...] | None:
    if args.components:
        return tuple(c.strip() for c in args.components.split(",") if c.strip())
    if args.branch == "all":
        return None
    return video_llama.BRANCHES[args.branch]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json")


def _has_tokenizer(d) -> bool:
    return bool(d) and any((Path(d) / f).is_file() for f in TOKENIZER_FILES)


def _tokenizer_source(args, meta: Mapping) -> str | None:
    """Where the exported LLaMA's tokenizer is: --tokenizer, else the trainer config's
    paths.tokenizer / llama_model, else the HF directory the LLaMA was imported from."""
    if args.tokenizer:
        if not _has_tokenizer(args.tokenizer):
            raise UsageError(f"--tokenizer {args.tokenizer}: none of {', '.join(TOKENIZER_FILES)} there")
        return args.tokenizer
    train_config = args.train_config or meta.get("train_config")
    candidates = []
    if train_config and os.path.isfile(train_config):
        paths = config_loader.load_file(train_config).get("paths", {})
        candidates += [paths.get("tokenizer", ""), paths.get("llama_model", "")]
    candidates.append((meta.get("subtrees", {}).get("llama") or {}).get("source", ""))
    return next((c for c in candidates if _has_tokenizer(c)), None)


def _copy_tokenizer(source: str | None, hf_dir: str, out) -> None:
    import shutil
    if source is None:
        print(f"note: no tokenizer files written to {hf_dir}: pass --tokenizer DIR (the LLaMA's tokenizer "
              "directory) so it loads with AutoTokenizer", file=out)
        return
    copied = [f for f in TOKENIZER_FILES if (Path(source) / f).is_file()]
    for f in copied:
        shutil.copy2(Path(source) / f, Path(hf_dir) / f)
    print(f"wrote {hf_dir}: tokenizer files {', '.join(copied)} from {source}", file=out)


def _load_stacked(params: Mapping) -> Mapping:
    """Stacked (scan_layers) towers are written per layer: each of their leaves is loaded once,
    whole, here rather than once per layer (so those, unlike per-layer params, do not stream)."""
    for name, (prefix, _) in video_llama.SCANNED.items():
        path = video_llama.PARAM_PATHS[name]
        if tree_paths.has(params, path) and prefix in tree_paths.get(params, path):
            tower = dict(tree_paths.get(params, path))
            tower[prefix] = jax.tree.map(np.asarray, tower[prefix])
            params = _merge(params, _with(path, tower))
    return params


def _with(path, value) -> dict:
    out: dict = {}
    tree_paths.set_in(out, path, value)
    return out


def cmd_export(args, out=sys.stdout) -> int:
    outputs = {"video_llama": args.video_llama, "hf": args.hf, "blip2": args.blip2, "eva_vit": args.eva_vit,
               "imagebind": args.imagebind}
    if not any(outputs.values()):
        raise UsageError("nothing to export: give --video-llama, --hf, --blip2, --eva-vit and/or --imagebind")
    for flag, dest in outputs.items():
        if dest and Path(dest).exists() and not args.overwrite:
            raise FileExistsError(f"{dest} exists (pass --overwrite to replace it)")
    meta = (params_checkpoint.read_manifest(args.checkpoint) if Path(args.checkpoint).is_dir() else None) or {}
    given = args.preset or args.train_config
    config = _model_config(args.preset or (None if given else meta.get("preset")), meta.get("llama_config"),
                           args.train_config or (None if given else meta.get("train_config")))
    # The stored shapes and dtypes only: each output's subtrees are read once they are all known.
    held = params_checkpoint.params_metadata(args.checkpoint, step=args.step)
    progress = not args.no_progress
    dtype = np_dtype(args.dtype)

    # Check everything before writing anything.
    params, wanted, components = held, set(), None
    if args.video_llama:
        components = video_llama.export_components(params, config, _export_components(args, config))
        _need(params, components, "--video-llama", args.checkpoint)
        wanted |= set(components)
    if args.hf:
        _need(params, ["llama"], "--hf", args.checkpoint)
        wanted.add("llama")
    for fmt in ("blip2", "eva_vit", "imagebind"):
        if outputs[fmt]:
            names = [c for c in TOWER_FILES[fmt][0] if c in video_llama.available_components(config)]
            if not names:
                raise UsageError(f"--{fmt.replace('_', '-')}: preset has no {', '.join(TOWER_FILES[fmt][0])}")
            _need(params, names, f"--{fmt.replace('_', '-')}", args.checkpoint)
            wanted |= set(names)
    # Lazy leaves: each tensor is restored as it is written (the HF export holds one at a time).
    params = _load_stacked(params_checkpoint.lazy_params(
        args.checkpoint, step=args.step, subtrees={video_llama.PARAM_PATHS[c][0] for c in wanted}))

    if args.video_llama:
        keys = sum(len(video_llama.component_entries(config, c)) for c in components)
        bar = progress_bar(keys, f"video-llama {Path(args.video_llama).name}", progress)
        sd = video_llama.save_video_llama(args.video_llama, params, config, components,
                                          np.float32 if dtype is None else dtype, not args.no_buffers,
                                          on_tensor=lambda k: bar.update(1))
        bar.close()
        print(f"wrote {args.video_llama}: {len(sd)} keys ({', '.join(components)}"
              f"{' + buffers' if not args.no_buffers else ''})", file=out)
    if args.hf:
        llama = tree_paths.get(params, video_llama.PARAM_PATHS["llama"])
        hf_llama.save_hf(llama, config.llama, args.hf, dtype=dtype, overwrite=True, progress=progress)
        print(f"wrote {args.hf} (HF LLaMA, {len(hf_llama.key_map(config.llama))} tensors)", file=out)
        _copy_tokenizer(_tokenizer_source(args, meta), args.hf, out)
    for fmt in ("blip2", "eva_vit", "imagebind"):
        dest = outputs[fmt]
        if not dest:
            continue
        entries, wrap = _tower_entries(config, fmt)
        bar = progress_bar(len(entries), f"{fmt} {Path(dest).name}", progress)
        sd = export_entries(video_llama.unstacked(params, config), entries, dtype, on_tensor=lambda k: bar.update(1))
        bar.close()
        save_state_dict(dest, sd, wrap=wrap, overwrite=True)
        print(f"wrote {dest}: {len(sd)} keys ({fmt} layout)", file=out)
    return 0


# ------------------------------------------------------------------------------------------ inspect

def guess_kind(keys: Sequence[str]) -> str:
    """What a state dict's keys look like: video_llama, blip2, eva_vit, imagebind, hf_llama or unknown."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("video_Qformer.") or has("audio_Qformer.") or has("llama_proj.") or has("audio_llama_proj."):
        return "video_llama"
    if has("visual_encoder.") and has("Qformer.bert."):
        return "blip2"
    if has("modality_trunks.") or has("modality_preprocessors."):
        return "imagebind"
    if has("blocks.0.attn.qkv.weight") and has("patch_embed."):
        return "eva_vit"
    if has("model.layers.") or has("model.embed_tokens."):
        return "hf_llama"
    return "unknown"


def cmd_inspect(args, out=sys.stdout) -> int:
    path = Path(args.path)
    if path.is_dir():
        if (path / hf_llama.CONFIG_NAME).is_file():
            c = hf_llama.config_from_hf(path)
            print(f"{path}: HF LLaMA directory: vocab {c.vocab_size}, hidden {c.hidden_size}, "
                  f"{c.num_layers} layers, {c.num_heads} heads ({c.num_kv_heads} kv)", file=out)
            return 0
        meta = params_checkpoint.read_manifest(path)
        print(params_checkpoint.describe(path, args.step), file=out)
        if meta:
            for name, src in meta.get("subtrees", {}).items():
                print(f"  {name} <- {src['source']} ({src['kind']})", file=out)
        return 0
    sd = read_state_dict(path)
    kind = guess_kind(sd)
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    print(f"{path}: {len(sd)} tensors ({'/'.join(dtypes)}), looks like: {kind}", file=out)
    if kind == "video_llama" and args.preset:
        config = _model_config(args.preset)
        found = video_llama.components_in(sd, config)
        print(f"  Video-LLaMA components ({args.preset}): {', '.join(found) or 'none'}", file=out)
    for key in list(sd)[: args.keys]:
        print(f"  {key} {tuple(sd[key].shape)} {sd[key].dtype}", file=out)
    return 0


# ------------------------------------------------------------------------------------------ keys

def cmd_keys(args, out=sys.stdout) -> int:
    from vllama_jax.convert import key_doc
    from vllama_jax.convert.common import atomic_file

    text = key_doc.markdown(args.preset)
    if not args.out:
        out.write(text)
        return 0
    with atomic_file(args.out) as tmp:
        tmp.write_text(text)
    print(f"wrote {args.out}", file=out)
    return 0


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllama-convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="PyTorch / HF checkpoints -> one orbax params checkpoint")
    imp.add_argument("out", help="params checkpoint directory to write")
    imp.add_argument("--preset", help=f"VideoLlamaConfig preset ({', '.join(VideoLlamaConfig.presets())}); "
                                      "with --update defaults to the checkpoint's")
    imp.add_argument("--train-config", help="trainer config file (configs/*.py) to take the model from instead")
    imp.add_argument("--llama", help="HF LLaMA/Vicuna/Llama-2/Llama-3 directory (its config.json is used)")
    imp.add_argument("--blip2", help="LAVIS BLIP-2 .pth (EVA ViT + ln_vision + Q-Former)")
    imp.add_argument("--eva-vit", help="LAVIS eva_vit_g.pth")
    imp.add_argument("--imagebind", help="imagebind_huge.pth (audio and vision towers)")
    imp.add_argument("--video-llama", action="append", help="Video-LLaMA / MiniGPT-4 .pth (repeatable)")
    imp.add_argument("--dtype", choices=DTYPES, help="store every tensor in this dtype (default: the LLaMA "
                                                     "keeps its stored dtype, the rest their config param dtype)")
    imp.add_argument("--strict", action="store_true", help="unplaced checkpoint keys are an error")
    imp.add_argument("--update", action="store_true", help="add/replace subtrees of an existing checkpoint")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    imp.add_argument("--no-progress", action="store_true")
    imp.set_defaults(func=cmd_import)

    exp = sub.add_parser("export", help="our checkpoint -> Video-LLaMA .pth / HF LLaMA / tower .pth files")
    exp.add_argument("checkpoint", help="params checkpoint, trainer workdir or orbax params directory")
    exp.add_argument("--step", type=int, help="training step of a trainer workdir (default: latest)")
    exp.add_argument("--preset", help="VideoLlamaConfig preset (default: the params checkpoint's)")
    exp.add_argument("--train-config", help="trainer config file (configs/*.py) to take the model from instead")
    exp.add_argument("--video-llama", help="write the Video-LLaMA .pth layout here")
    exp.add_argument("--branch", choices=("video", "audio", "all"), default="all",
                     help="which trainable heads go into --video-llama (all: every one present)")
    exp.add_argument("--components", help=f"explicit comma-separated components ({', '.join(video_llama.COMPONENTS)})")
    exp.add_argument("--no-buffers", action="store_true", help="leave out the reference's buffers")
    exp.add_argument("--hf", help="write the LLaMA as an HF directory here")
    exp.add_argument("--tokenizer", help="tokenizer directory copied into the --hf directory (default: the "
                                         "trainer config's paths.tokenizer / llama_model, or the imported LLaMA's)")
    exp.add_argument("--blip2", help="write a BLIP-2 .pth here")
    exp.add_argument("--eva-vit", help="write an eva_vit_g.pth here")
    exp.add_argument("--imagebind", help="write an imagebind_huge.pth (audio + vision keys) here")
    exp.add_argument("--dtype", choices=DTYPES, help="stored dtype (default: float32 for --video-llama, "
                                                     "the params' own dtype otherwise)")
    exp.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    exp.add_argument("--no-progress", action="store_true")
    exp.set_defaults(func=cmd_export)

    ins = sub.add_parser("inspect", help="what a .pth, HF directory or params checkpoint holds")
    ins.add_argument("path")
    ins.add_argument("--preset", help="also list the Video-LLaMA components found for this preset")
    ins.add_argument("--step", type=int)
    ins.add_argument("--keys", type=int, default=20, help="how many keys to list")
    ins.set_defaults(func=cmd_inspect)

    keys = sub.add_parser("keys", help="the written key map (original key <-> our param path) as markdown")
    keys.add_argument("--preset", default="vicuna7b", help="whose shapes to list (default: vicuna7b)")
    keys.add_argument("--out", help="write it here (docs/CHECKPOINT_KEYS.md) instead of stdout")
    keys.set_defaults(func=cmd_keys)
    return parser


@entry_point("vllama-convert")
def main(argv: Sequence[str] | None = None, out=None) -> int:
    """Console entry point (`vllama-convert = vllama_jax.convert.cli:main`)."""
    out = sys.stdout if out is None else out
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args, out)
    except (UsageError, ValueError) as e:   # its converters' ValueErrors name the input
        raise UserError(str(e)) from e


if __name__ == "__main__":
    sys.exit(main())
