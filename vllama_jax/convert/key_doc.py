"""The written key map (`docs/CHECKPOINT_KEYS.md`), generated from the converters' `Entry` tables.

`vllama-convert keys --out docs/CHECKPOINT_KEYS.md` writes it; a test regenerates it and compares, so
the document cannot drift from the code. Per-layer keys are folded into one row with `{i}` (the
layer index is the same on both sides), shapes are those of the named preset, and the layout column
says how a tensor is rearranged: it is found by pushing an index-valued probe of the `tiny` preset
through the entry (cheap, exact), while the real-size shapes come from a zero-stride probe (no
memory). A test checks that every row's layout holds for the tiny preset's actual entries.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Iterable

import numpy as np

from vllama_jax.convert import lavis
from vllama_jax.convert import video_llama as vl
from vllama_jax.convert.common import Entry
from vllama_jax.models.video_llama import VideoLlamaConfig

DOC_PRESET = "vicuna7b"
DOC_PATH = "docs/CHECKPOINT_KEYS.md"

_TORCH_LAYER = re.compile(r"\b(blocks|layer|layers)\.(\d+)\.")
_FLAX_LAYER = re.compile(r"\b(blocks|block|layer|layers)_(\d+)(?=/|$)")


@dataclasses.dataclass
class Row:
    """One key pattern: `{i}` stands for the layer index, `layers` lists the indices it takes."""
    component: str
    key: str
    torch_shape: tuple[int, ...]
    paths: tuple[str, ...]
    flax_shapes: tuple[tuple[int, ...], ...]
    layout: str
    layers: list[int] = dataclasses.field(default_factory=list)


def _fold(entry: Entry) -> tuple[str, tuple[str, ...], int | None]:
    """(key pattern, path patterns, layer index) with the layer index folded to `{i}` when the torch
    key and every Flax path carry the same single one."""
    paths = tuple("/".join(p) for p in entry.paths)
    tm = _TORCH_LAYER.findall(entry.key)
    fm = [_FLAX_LAYER.findall(p) for p in paths]
    if len(tm) == 1 and all(len(m) == 1 and m[0][1] == tm[0][1] for m in fm):
        i = tm[0][1]
        key = _TORCH_LAYER.sub(lambda m: f"{m.group(1)}.{{i}}.", entry.key)
        paths = tuple(_FLAX_LAYER.sub(lambda m: f"{m.group(1)}_{{i}}", p) for p in paths)
        return key, paths, int(i)
    return entry.key, paths, None


def layout(entry: Entry) -> str:
    """How `entry.to_flax` rearranges a tensor, found with an index-valued probe."""
    probe = np.arange(int(np.prod(entry.shape)), dtype=np.int64).reshape(entry.shape)
    parts = entry.to_flax(probe)
    if len(parts) == 1:
        return _rearranged(probe, parts[0])
    pieces = np.split(probe, len(parts), axis=0)
    how = {_rearranged(src, out) for src, out in zip(pieces, parts)}
    if len(how) != 1:
        return f"split in {len(parts)} along dim 0: " + "; ".join(_rearranged(s, o) for s, o in zip(pieces, parts))
    return f"split in {len(parts)} along dim 0 (one part per path), each {how.pop()}"


def _rearranged(src: np.ndarray, out: np.ndarray) -> str:
    if out.shape == src.shape and np.array_equal(out, src):
        return "as is"
    if src.ndim == 2 and out.shape == src.T.shape and np.array_equal(out, src.T):
        return "transposed"
    perms = list(itertools.permutations(range(src.ndim)))
    for perm in perms:  # a pure permutation first: [out, in, *window] -> [*window, in, out] reads best
        if src.transpose(perm).shape == out.shape and np.array_equal(out, src.transpose(perm)):
            return f"axes permuted {perm}"
    for perm in perms:
        if np.array_equal(out.ravel(), src.transpose(perm).ravel()):
            moved = perm != tuple(range(src.ndim))
            return (f"axes permuted {perm}, " if moved else "") + "reshaped"
    raise ValueError(f"cannot describe how {src.shape} becomes {out.shape}: not a permutation + reshape")


def _flax_shapes(entry: Entry) -> tuple[tuple[int, ...], ...]:
    """The Flax shapes of a real-size entry without allocating it (all strides zero)."""
    probe = np.broadcast_to(np.zeros((), np.float32), entry.shape)
    return tuple(tuple(p.shape) for p in entry.to_flax(probe))


def rows(config: VideoLlamaConfig, layout_config: VideoLlamaConfig | None = None) -> list[Row]:
    """The folded key map of `config`; layouts probed on `layout_config` (default: the tiny preset)."""
    layout_config = layout_config or VideoLlamaConfig.preset("tiny")
    layouts: dict[tuple[str, str], str] = {}
    for name, entries in vl.key_map(layout_config).items():
        for e in entries:
            layouts.setdefault((name, _fold(e)[0]), layout(e))
    out: dict[tuple[str, str], Row] = {}
    for name, entries in vl.key_map(config).items():
        for e in entries:
            key, paths, i = _fold(e)
            row = out.get((name, key))
            if row is None:
                how = layouts.get((name, key))
                if how is None:  # a pattern the small preset lacks: probe the real entry
                    how = layout(e)
                row = out[(name, key)] = Row(name, key, e.shape, paths, _flax_shapes(e), how)
            if i is not None:
                row.layers.append(i)
    return list(out.values())


def _indices(layers: list[int]) -> str:
    if not layers:
        return ""
    if len(layers) == 1:
        return f"{layers[0]}"
    step = layers[1] - layers[0]
    if all(b - a == step for a, b in zip(layers, layers[1:])):
        return f"{layers[0]}..{layers[-1]}" if step == 1 else f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"
    return ", ".join(map(str, layers))


QFORMER_PREFIX = r"(Qformer|video_Qformer|audio_Qformer)\.bert\."


def _cell(text: str) -> str:
    """Table-cell safe: a `|` (regex alternation) would end the cell."""
    return text.replace("|", "\\|")


def _shape(s: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


_FILES = (
    ("released Video-LLaMA `.pth` (`ckpt` / `ckpt_2`), MiniGPT-4 `pretrained_minigpt4.pth`",
     "`{\"model\": state_dict, ...}`", "the keys below as written", "video_llama"),
    ("LAVIS BLIP-2 `.pth` (`blip2_pretrained_flant5xxl.pth`)", "`{\"model\": state_dict, ...}`",
     "the keys of `visual_encoder`, `ln_vision`, `image_qformer` as written", "blip2"),
    ("LAVIS `eva_vit_g.pth`", "bare state dict", "the `visual_encoder` keys without `visual_encoder.`", "eva_vit"),
    ("`imagebind_huge.pth`", "bare state dict",
     "the `audio_encoder` and `audio_vision_encoder` keys without `audio_encoder.`", "imagebind"),
    ("HF LLaMA / Vicuna / Llama-2 / Llama-3 directory", "`config.json` + safetensors (or `pytorch_model*.bin`)",
     "the `llama` keys without `llama_model.`", "hf"),
)

_OTHER_IGNORED = (
    ("`visual_encoder.blocks.{i}.*` with i >= depth, `visual_encoder.(norm|fc_norm|head).*`",
     "EVA parts LAVIS' ViT does not build (BLIP-2 drops the last block)"),
    ("`Qformer.cls.*`, `text_proj.*`, `vision_proj.*`, `itm_head.*`, `temp`, `(t5|opt|llm)_(proj|model).*`",
     "BLIP-2 text side / language-model part"),
    ("`audio_encoder.modality_*.(text|depth|thermal|imu).*` (bare in `imagebind_huge.pth`)",
     "ImageBind modalities Video-LLaMA does not use"),
    ("`llama_model.lm_head.weight` when the LLaMA ties its embeddings", "tied embeddings: lm_head is embed_tokens"),
)


def markdown(preset: str = DOC_PRESET) -> str:
    """The whole document for `preset`'s sizes."""
    config = VideoLlamaConfig.preset(preset)
    table = rows(config)
    lines = [
        "# Checkpoint key map: original PyTorch keys <-> our param paths",
        "",
        f"Generated by `vllama-convert keys --preset {preset} --out {DOC_PATH}` from the converters' key",
        "tables (`vllama_jax/convert/video_llama.py`, `lavis.py`, `imagebind.py`, `hf_llama.py`); do not edit",
        "by hand (`tests/test_key_doc.py` fails when it is out of date).",
        "",
        f"Shapes are those of the `{preset}` preset. `{{i}}` is a layer index, the same on both sides; the",
        "`layers` column lists the values it takes. Our paths are under the `VideoLlama` params tree (what",
        "`vllama-convert import` writes and the trainer / chat load). Torch `Linear.weight [out, in]` is a",
        "Flax `kernel [in, out]` (\"transposed\"); every conversion is a reshape / transpose / split only, so",
        "a round trip is bit exact.",
        "",
        "## Files and their key prefixes",
        "",
        "| file | container | keys |",
        "|---|---|---|",
    ]
    lines += [f"| {what} | {box} | {keys} |" for what, box, keys, _ in _FILES]
    lines += [
        "",
        "Import finds which components a Video-LLaMA file holds (any of a component's parameter keys) and then",
        "requires all of that component's keys with these shapes; a missing key or a wrong shape is an error",
        "naming the key. Keys that are neither mapped nor ignored (below) are reported as unmatched (an",
        "error with `--strict`); the reference's `load_state_dict(strict=False)` silently dropped them.",
        "",
        "## Ignored keys",
        "",
        "| key pattern (regex) | why |",
        "|---|---|",
    ]
    lines += [f"| `{_cell(r)}` | {why} |" for r, why in vl.BUFFER_RULES]
    lines += [f"| `{_cell(QFORMER_PREFIX + r)}` | {why} |" for r, why in lavis.QFORMER_IGNORED]
    lines += [f"| {_cell(r)} | {why} |" for r, why in _OTHER_IGNORED]
    lines += [
        "",
        "Export writes the buffers back (`--no-buffers` leaves them out) with the values the reference",
        "computes, in the reference's state_dict order.",
    ]
    by_component: dict[str, list[Row]] = {}
    for row in table:
        by_component.setdefault(row.component, []).append(row)
    for name, comp_rows in by_component.items():
        count = sum(max(1, len(r.layers)) for r in comp_rows)
        lines += [
            "",
            f"## {name} -> `{'/'.join(vl.PARAM_PATHS[name])}` ({count} tensor{'s' if count > 1 else ''})",
            "",
            "| original key | torch shape | our param path | Flax shape | layout | layers |",
            "|---|---|---|---|---|---|",
        ]
        for r in comp_rows:
            paths = "<br>".join(f"`{p}`" for p in r.paths)
            shapes = "<br>".join(_shape(s) for s in r.flax_shapes)
            lines.append(f"| `{r.key}` | {_shape(r.torch_shape)} | {paths} | {shapes} | {r.layout} | "
                         f"{_indices(r.layers)} |")
    return "\n".join(lines) + "\n"
