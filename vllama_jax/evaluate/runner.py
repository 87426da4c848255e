"""Answers for a held-out shard set, generated in fixed-shape batches, scored (metrics.py), as a report.

    records (ArrayRecord shards or decoded example dicts)
      -> items: one per human/gpt pair of a conversation record (a single-turn prompt: the
         record's media, then the question), one per caption record (the caption prompt)
      -> prompts built with the training data's own functions (`data_pipelines.prompts`:
         `insert_media` + the Vicuna / Llama-2 text, or `tokenize_caption`'s prefix), so the model
         sees exactly the layout it was trained on; the media soft tokens fill the placeholder
         block in the order of `media` (audio before video, as the reference's inference does)
      -> batches of fixed shape (left-padded to a multiple of `bucket`, the last batch padded
         with copies) -> `generate.generate` (greedy by default) -> answers cut at the stop sign
      -> scores (metrics.py): attribute accuracy vs chance (the demo set's labels in each record's
         meta), QA exact / contained match, BLEU-1..4 and CIDEr-D for captions.

A Vicuna prompt ends at "###Assistant:" (no space), as the reference's `Conversation.get_prompt`
does: in training "Assistant: red" tokenizes as ":" + "▁red", so the model's first token carries
the space. Llama-2 prompts end at "[/INST]".

`run_eval(model, records, ...) -> report` is what `vllama-eval` (cli.py) and the demo call;
`write_report` writes it as JSON. The media's soft tokens come from `vllama_jax.media_encoding`,
the module chat and the web page use too.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import loader
from data_pipelines import prompts
from data_pipelines.records import IMAGE_PLACEHOLDER
from vllama_jax import media_encoding
from vllama_jax.evaluate.metrics import DEMO_QUESTIONS, EvalError, score_examples
from vllama_jax.generate import FINISH_EOS, FINISH_NAMES, GenerationConfig, generate, stop_tables_for
from vllama_jax.inference import InferenceModel
from vllama_jax.models.video_llama import splice_media
from vllama_jax.progress import progress_bar


# ------------------------------------------------------------------------------------ prompts

@dataclasses.dataclass
class _Item:
    """One prompt to answer; `soft` is its clip's media soft tokens (shared by the clip's items)."""
    index: int
    kind: str                       # 'qa' | 'caption'
    ids: list[int]                  # prompt ids, patch ids at the media positions
    media: tuple[str, ...]
    soft: jax.Array                 # [K, d_llm], K = the media's tokens in order


def default_loader_config(model: InferenceModel) -> loader.LoaderConfig:
    """The eval prompt format for a model loaded without its trainer config: its conversation
    style and media layout, stage-1 captions (no prompt, ending at a newline)."""
    return loader.LoaderConfig(num_frames=model.num_frames, image_size=model.image_size,
                               num_audio_clips=model.num_audio_clips, conv_style=model.conv_style,
                               train=False, shuffle=False, num_epochs=1)


def _media_for(example: Mapping, media: Sequence[str] | None, model: InferenceModel) -> tuple[str, ...]:
    """The media of one record: `media` (default: audio first, then video, when the model has the
    audio branch), without audio when the record has no sound (the reference falls back the same way)."""
    has_audio = model.config.has_audio
    wanted = tuple(media) if media is not None else (("audio", "video") if has_audio else ("video",))
    if "audio" in wanted and not has_audio:
        raise EvalError("media includes 'audio' but the model has no audio branch")
    chosen = tuple(m for m in wanted if m != "audio" or example["audio_present"])
    if not chosen:
        raise EvalError(f"record {example.get('id')!r} has no audio track and media is {wanted}")
    return chosen


def _clip_tokens(model: InferenceModel, example: Mapping, idx: np.ndarray, lc, media: tuple[str, ...],
                 where: str) -> jax.Array:
    """`[K, d_llm]`: the record's media soft tokens in `media` order, once per clip for all its questions:
    the loader's eval transform (frames `idx`; an image is a 1-frame clip, as the reference encodes it)."""
    frames = loader.frame_pixels(example, idx, lc.image_size)
    try:
        fbank = loader.stored_fbank(example, lc.num_audio_clips, where) if "audio" in media else None
    except loader.LoaderError as e:
        raise EvalError(str(e)) from e
    return media_encoding.soft_tokens(model.params, model.config, media, frames, fbank)


def _qa_pairs(turns: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    return [(h["value"], g["value"]) for h, g in zip(turns, turns[1:])
            if h["from"] == "human" and g["from"] == "gpt"]


def _show_prompt(text: str, k: int) -> str:
    """The prompt text for the report, its run of placeholders written once with a count."""
    return text.replace(IMAGE_PLACEHOLDER * k, f"{IMAGE_PLACEHOLDER}x{k}", 1)


def qa_prompt(question: str, example_media: str, num_media_tokens: int, conv_style: str,
              time_msg: str = "", where: str = "") -> str:
    """A single-turn prompt for `question` about the record's media, cut where the answer starts."""
    turns = prompts.insert_media([{"from": "human", "value": question}], example_media, num_media_tokens,
                                 time_msg, where)
    if conv_style == "vicuna":
        return prompts.vicuna_text(turns)[0] + "Assistant:"
    if conv_style == "llama_v2":
        return prompts.llama2_text(turns, where=where)
    raise EvalError(f"conv_style must be one of {prompts.CONV_STYLES}, got {conv_style!r}")


def _record_prompts(example: Mapping, k: int, lc, encoder, kinds, questions, caption_prompt, time_msg: str,
                    where: str) -> list[tuple[str, list[int], str, dict]]:
    """(kind, prompt ids, prompt text, report fields) of each item of one record."""
    out = []
    if example["kind"] == "conversation" and "qa" in kinds:
        for question, reference in _qa_pairs(example["conversations"]):
            text = qa_prompt(question, example["media"], k, lc.conv_style, time_msg, where)
            plain = question.replace(IMAGE_PLACEHOLDER, "").strip()
            attr = questions.get(plain)
            label = example["meta"].get(attr) if attr else None
            out.append(("qa", encoder(text, add_bos=True), text,
                        dict(question=plain, reference=reference, attribute=attr if label is not None else None,
                             label=label)))
    elif example["kind"] == "caption" and "caption" in kinds:
        # The loader's eval caption row without the caption: [bos] + prompt around the patches.
        ids, _ = prompts.tokenize_caption("", encoder, k, caption_prompt, "", lc.max_txt_len)
        text = (caption_prompt or IMAGE_PLACEHOLDER).replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * k)
        out.append(("caption", ids, text, dict(question=caption_prompt or "", reference=example["caption"],
                                               attribute=None, label=None)))
    return out


# ------------------------------------------------------------------------------------ generation

@jax.jit
def _prompt_embeds(table, ids, media_mask, soft):
    """Token embeddings with the soft tokens put at the media positions: `[B, L, d_llm]`."""
    return splice_media(jnp.take(table, ids, axis=0), soft, media_mask)


class _Runner:
    """Generates the answers of same-kind, same-media batches with fixed shapes."""

    def __init__(self, model: InferenceModel, encoder, gen: GenerationConfig, batch_size: int, bucket: int,
                 stops: dict[str, tuple[str, ...]], mesh):
        self.model, self.encoder, self.gen, self.mesh = model, encoder, gen, mesh
        self.batch_size, self.bucket, self.stops = batch_size, bucket, stops
        self._tables = {}

    def tables(self, stops):
        if stops not in self._tables:
            self._tables[stops] = stop_tables_for(self.model.tokenizer, stops, self.model.config.llama.vocab_size)
        return self._tables[stops]

    def __call__(self, items: list[_Item]) -> list[tuple[str, list[int], str]]:
        n = len(items)
        rows = items + [items[0]] * (self.batch_size - n)   # fixed batch: one program per bucket
        length = -(-max(len(it.ids) for it in rows) // self.bucket) * self.bucket
        ids = np.zeros((len(rows), length), np.int32)
        media_mask = np.zeros((len(rows), length), bool)
        attention = np.zeros((len(rows), length), np.int32)
        for r, it in enumerate(rows):
            row = np.asarray(it.ids)
            is_patch = row == self.encoder.patch_id
            ids[r, length - len(row):] = np.where(is_patch, 0, row)
            media_mask[r, length - len(row):] = is_patch
            attention[r, length - len(row):] = 1
        config = self.model.config
        table = self.model.params["llama"]["embed_tokens"]["embedding"]
        embeds = _prompt_embeds(table, jnp.asarray(ids), jnp.asarray(media_mask),
                                jnp.stack([it.soft for it in rows])).astype(config.llama.dtype)
        stops = self.stops[items[0].kind]
        gen = self.gen.replace(stop_strings=stops)
        out = generate(self.model.params["llama"], config.llama, gen, inputs_embeds=embeds,
                       attention_mask=jnp.asarray(attention), stop_tables=self.tables(stops) if stops else None,
                       mesh=self.mesh)
        reasons = np.asarray(out.finish_reason)
        results = []
        for r, tokens in enumerate(out.rows()[:n]):
            kept = tokens[:-1] if reasons[r] == FINISH_EOS else tokens
            text = self.model.tokenizer.decode(kept, skip_special_tokens=False)
            for s in stops:
                text = text.split(s)[0]
            results.append((text.strip(), tokens, FINISH_NAMES[int(reasons[r])]))
        return results


# ------------------------------------------------------------------------------------ records

def _record_source(records) -> tuple[Sequence, int]:
    """(indexable records, count) from shard paths / globs or a sequence of decoded examples."""
    from data_pipelines.loader import LoaderError, ShardSource

    if isinstance(records, ShardSource):
        return records, len(records)
    if isinstance(records, (str, os.PathLike)):
        records = [os.fspath(records)]
    records = list(records)
    if records and all(isinstance(r, (str, os.PathLike)) for r in records):
        try:
            source = ShardSource([os.fspath(r) for r in records])
        except LoaderError as e:
            raise EvalError(str(e)) from e
        return source, len(source)
    if not all(isinstance(r, Mapping) for r in records):
        raise EvalError("records must be shard paths / globs or decoded example dicts (records.decode_example)")
    return records, len(records)


# ------------------------------------------------------------------------------------ run

def run_eval(model: InferenceModel, records, *, loader_config=None, media: Sequence[str] | None = None,
             batch_size: int = 8, max_new_tokens: int = 24, generation: GenerationConfig | None = None,
             limit: int | None = None, bucket: int = 32, kinds: Sequence[str] = ("qa", "caption"),
             questions: Mapping[str, str] | None = None, choices: Mapping[str, Sequence[str]] | None = None,
             groups: Mapping[str, Sequence[str]] | None = None, mesh=None, progress: bool = True) -> dict:
    """Answers every question (and caption prompt) of `records` with `model` and scores them.

    records: shard paths / globs, or decoded example dicts. loader_config: the training data's
      `LoaderConfig` (prompt style, caption prompts and end symbol, frames, image size, audio
      clips; `loader.loader_config_from(train_config, train=False)`); default from the model.
    media: soft tokens in the placeholder block, in order (default ('audio', 'video') with an audio
      branch, else ('video',)); audio is left out for records without sound.
    generation: default greedy with `max_new_tokens`; its stop strings are replaced per task
      (Vicuna: '###'; captions: the end symbol), eos always stops.
    questions: question text -> attribute, for records whose meta labels it (default: the demo
      set's); choices / groups: see `score_attributes`.
    Returns {'metrics': {...}, 'examples': [...], 'settings': {...}, 'timing': {...}}.
    """
    from data_pipelines.tokenizer import TextEncoder

    if batch_size < 1 or bucket < 1:
        raise EvalError(f"batch_size and bucket must be >= 1, got {batch_size}, {bucket}")
    unknown = set(kinds) - {"qa", "caption"}
    if unknown:
        raise EvalError(f"kinds must be among ('qa', 'caption'), got {sorted(unknown)}")
    if media is not None and (not media or set(media) - {"audio", "video"} or len(set(media)) != len(media)):
        raise EvalError(f"media must list 'audio' and/or 'video' once each (in placeholder order), got {media!r}")
    lc = loader_config or default_loader_config(model)
    questions = DEMO_QUESTIONS if questions is None else questions
    encoder = TextEncoder(model.tokenizer)
    eos = model.tokenizer.eos_token_id
    gen = generation or GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                         eos_token_ids=() if eos is None else (int(eos),),
                                         pad_token_id=encoder.pad_id)
    stops = {"qa": ("###",) if lc.conv_style == "vicuna" else (), "caption": (lc.end_sym,) if lc.end_sym else ()}
    caption_prompt = prompts.caption_prompt(lc.caption_prompts, lc.caption_template, None)
    run = _Runner(model, encoder, gen, batch_size, bucket, stops, mesh)

    source, count = _record_source(records)
    count = count if limit is None else min(count, int(limit))
    examples: list[dict] = []
    pending: dict[tuple, list[_Item]] = collections.defaultdict(list)
    timing = {"generate_s": 0.0, "batches": 0}

    def flush(items):
        t0 = time.perf_counter()
        for it, (text, tokens, reason) in zip(items, run(items)):
            examples[it.index].update(answer=text, num_tokens=len(tokens), finish=reason)
        timing["generate_s"] += time.perf_counter() - t0
        timing["batches"] += 1

    start = time.perf_counter()
    for r in progress_bar(range(count), desc="eval", unit="clip", disable=not progress):
        example = source[r]
        where = f"record {example.get('id', r)!r}"
        chosen = _media_for(example, media, model)
        k = model.config.num_media_tokens(chosen)
        idx = loader.frame_indices(example, lc.num_frames)
        times = np.asarray(example["frame_times"], np.float32)[idx]
        soft = None
        time_msg = prompts.video_time_message(times) if example["media"] == "video" and lc.video_time_msg else ""
        for kind, ids, text, info in _record_prompts(example, k, lc, encoder, kinds, questions, caption_prompt,
                                                     time_msg, where):
            found = sum(i == encoder.patch_id for i in ids)
            if found != k:
                raise EvalError(f"{where}: the prompt holds {found} media positions, expected {k}")
            top = max((i for i in ids if i != encoder.patch_id), default=0)
            if top >= model.config.llama.vocab_size:
                raise EvalError(f"the tokenizer gave id {top} but the model's vocab has "
                                f"{model.config.llama.vocab_size} tokens: this tokenizer does not belong to this model")
            examples.append(dict(id=example.get("id", str(r)), kind=kind, media=list(chosen),
                                 prompt=_show_prompt(text, k), **info))
            key = (kind, chosen)
            if soft is None:   # once per clip, for all its questions
                soft = _clip_tokens(model, example, idx, lc, chosen, where)
            pending[key].append(_Item(len(examples) - 1, kind, ids, chosen, soft))
            if len(pending[key]) == batch_size:
                flush(pending.pop(key))
    for items in list(pending.values()):
        flush(items)
    if not examples:
        raise EvalError(f"no {' / '.join(kinds)} items in the {count} records given")
    wall = time.perf_counter() - start

    metrics = score_examples(examples, choices=choices, groups=groups)
    settings = {"batch_size": batch_size, "bucket": bucket, "conv_style": lc.conv_style,
                "media": list(media) if media is not None else "auto", "records": count,
                "generation": {k: v for k, v in dataclasses.asdict(gen).items() if k != "stop_strings"},
                "stop_strings": {k: list(v) for k, v in stops.items()}, "num_frames": lc.num_frames,
                "image_size": lc.image_size, "caption_prompt": caption_prompt}
    return {"metrics": metrics, "examples": examples, "settings": settings,
            "timing": {"wall_s": round(wall, 3), "generate_s": round(timing["generate_s"], 3),
                       "batches": timing["batches"], "items_per_s": round(len(examples) / wall, 3)}}



def write_report(report: dict, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")

