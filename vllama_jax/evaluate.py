"""Evaluation (`vllama-eval`): generate answers for a held-out shard set, score them, write a JSON report.

    records (ArrayRecord shards or decoded example dicts)
      -> items: one per human/gpt pair of a conversation record (a single-turn prompt: the
         record's media, then the question), one per caption record (the caption prompt)
      -> prompts built with the training data's own functions (`data_pipelines.prompts`:
         `insert_media` + the Vicuna / Llama-2 text, or `tokenize_caption`'s prefix), so the model
         sees exactly the layout it was trained on; the media soft tokens fill the placeholder
         block in the order of `media` (audio before video, as the reference's inference does)
      -> batches of fixed shape (left-padded to a multiple of `bucket`, the last batch padded
         with copies) -> `generate.generate` (greedy by default) -> answers cut at the stop sign
      -> scores: attribute accuracy vs chance (the demo set's labels in each record's meta), QA
         exact / contained match, BLEU-1..4 and CIDEr-D for captions.

A Vicuna prompt ends at "###Assistant:" (no space), as the reference's `Conversation.get_prompt`
does: in training "Assistant: red" tokenizes as ":" + "▁red", so the model's first token carries
the space. Llama-2 prompts end at "[/INST]".

Library API (the demo calls these): `run_eval(model, records, ...) -> report`, `score_attributes`,
`qa_accuracy`, `bleu`, `cider`, `normalize_answer`, `parse_choice`, `write_report`.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import prompts as P
from data_pipelines import synthetic
from data_pipelines import video as V
from data_pipelines.records import IMAGE_PLACEHOLDER, decode_jpeg
from vllama_jax.generate import FINISH_EOS, FINISH_NAMES, GenerationConfig, generate, stop_tables_for
from vllama_jax.cli_errors import entry_point
from vllama_jax.inference import InferenceModel
from vllama_jax.models.video_llama import splice_media
from vllama_jax.progress import progress_bar

# Question text -> attribute name, for records whose meta carries attribute labels (the demo set).
DEMO_QUESTIONS = {q: a for a, q in synthetic.QUESTIONS.items()}
DEMO_GROUPS = {"visual": synthetic.VISUAL, "audio": synthetic.AUDIO}


class EvalError(ValueError):
    """Evaluation input (records, shards, media, settings) that cannot be used."""


# ------------------------------------------------------------------------------------ answers

def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace squeezed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", str(text).lower()).split())


def parse_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The choice an answer names: its first word when that is a choice, else the only choice
    contained in it as whole words; None when it names none or several."""
    norm = normalize_answer(answer)
    words = norm.split()
    if words and words[0] in choices:
        return words[0]
    found = {c for c in choices if f" {normalize_answer(c)} " in f" {norm} "}
    return found.pop() if len(found) == 1 else None


def score_attributes(answers: Sequence[Mapping[str, str]], labels: Sequence[Mapping[str, str]],
                     choices: Mapping[str, Sequence[str]] | None = None,
                     groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Per-attribute accuracy of answers against labels.

    answers[i] / labels[i]: {attribute: answer text} / {attribute: true value} of clip i (a record's
    meta works as labels; keys without an answer are ignored). choices: the values of each
    attribute (default: the demo set's). groups: named attribute sets averaged together (default
    visual / audio). Chance is 1 / number of values; `majority` is the accuracy of always naming the
    most frequent label, the better baseline when labels are unbalanced.
    """
    choices = synthetic.ATTRIBUTES if choices is None else choices
    groups = DEMO_GROUPS if groups is None else groups
    if len(answers) != len(labels):
        raise EvalError(f"score_attributes: {len(answers)} answer sets but {len(labels)} label sets")
    rows = collections.defaultdict(list)   # attribute -> [(label, predicted)]
    for i, (ans, lab) in enumerate(zip(answers, labels)):
        for attr, text in ans.items():
            if attr not in choices:
                raise EvalError(f"score_attributes: clip {i}: unknown attribute {attr!r}; known: {sorted(choices)}")
            if attr not in lab:
                raise EvalError(f"score_attributes: clip {i} has an answer for {attr!r} but no label")
            rows[attr].append((str(lab[attr]), parse_choice(text, choices[attr])))
    per = {}
    for attr in [a for a in choices if a in rows]:
        pairs = rows[attr]
        correct = sum(lab == pred for lab, pred in pairs)
        label_counts = collections.Counter(lab for lab, _ in pairs)
        confusion = {lab: dict(collections.Counter(str(pred) for l2, pred in pairs if l2 == lab))
                     for lab in sorted(label_counts)}
        per[attr] = {"accuracy": correct / len(pairs), "correct": correct, "total": len(pairs),
                     "chance": 1.0 / len(choices[attr]), "majority": max(label_counts.values()) / len(pairs),
                     "unparsed": sum(pred is None for _, pred in pairs), "confusion": confusion}
    total = sum(p["total"] for p in per.values())
    out = {"per_attribute": per, "groups": {},
           "overall": sum(p["correct"] for p in per.values()) / total if total else None, "total": total}
    for name, attrs in groups.items():
        present = [per[a]["accuracy"] for a in attrs if a in per]
        if present:
            out["groups"][name] = {"accuracy": float(np.mean(present)),
                                   "chance": float(np.mean([per[a]["chance"] for a in attrs if a in per])),
                                   "attributes": [a for a in attrs if a in per]}
    return out


def qa_accuracy(answers: Sequence[str], references: Sequence[str]) -> dict:
    """exact: normalized answer == normalized reference; contains: the reference's words appear
    as a whole in the answer."""
    if len(answers) != len(references):
        raise EvalError(f"qa_accuracy: {len(answers)} answers but {len(references)} references")
    exact = contains = 0
    for a, r in zip(answers, references):
        a, r = normalize_answer(a), normalize_answer(r)
        exact += a == r
        contains += bool(r) and f" {r} " in f" {a} "
    n = len(answers)
    return {"count": n, "exact": exact / n if n else None, "contains": contains / n if n else None}


# ------------------------------------------------------------------------------------ caption metrics

def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _as_refs(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check_pairs(name: str, candidates, references) -> list[list[str]]:
    refs = _as_refs(references)
    if len(candidates) != len(refs):
        raise EvalError(f"{name}: {len(candidates)} candidates but {len(refs)} reference sets")
    if any(not r for r in refs):
        raise EvalError(f"{name}: every candidate needs at least one reference")
    return refs


def bleu(candidates: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-`max_n` (Papineni et al. 2002) over normalized words: clipped n-gram counts and
    lengths summed over the corpus, uniform weights, brevity penalty against each candidate's
    closest reference length (ties: the shorter), as coco-caption's scorer. 0 when some order
    has no match (no smoothing)."""
    refs = _check_pairs("bleu", candidates, references)
    matched, total = np.zeros(max_n), np.zeros(max_n)
    cand_len = ref_len = 0
    for cand, rs in zip(candidates, refs):
        words = normalize_answer(cand).split()
        ref_words = [normalize_answer(r).split() for r in rs]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            most = collections.Counter()
            for r in ref_words:
                most |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if cand_len == 0 or np.any(matched == 0):
        return 0.0
    log_precision = float(np.mean(np.log(matched / total)))
    brevity = min(0.0, 1.0 - ref_len / cand_len)
    return math.exp(log_precision + brevity)


def cider(candidates: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4,
          sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, coco-caption's `CiderD`): per n-gram order, TF-IDF vectors
    (document frequency over the corpus' reference sets, IDF = log(#clips) - log(df)); the
    candidate's weights clipped to each reference's, cosine-normalized, times a Gaussian penalty
    on the length difference (sigma 6); averaged over orders and references, times 10, averaged
    over the corpus."""
    refs = _check_pairs("cider", candidates, references)
    if not refs:
        return 0.0
    cand_words = [normalize_answer(c).split() for c in candidates]
    ref_words = [[normalize_answer(r).split() for r in rs] for rs in refs]
    df = collections.Counter()
    for rs in ref_words:
        df.update({g for r in rs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_docs = math.log(len(refs))

    def vector(words):
        vec = [{} for _ in range(max_n)]
        for n in range(1, max_n + 1):
            for g, tf in _ngrams(words, n).items():
                vec[n - 1][g] = tf * (log_docs - math.log(max(1.0, df[g])))
        return vec, [math.sqrt(sum(v * v for v in d.values())) for d in vec]

    scores = []
    for words, rs in zip(cand_words, ref_words):
        cvec, cnorm = vector(words)
        per_ref = []
        for r in rs:
            rvec, rnorm = vector(r)
            penalty = math.exp(-((len(words) - len(r)) ** 2) / (2 * sigma ** 2))
            sims = []
            for n in range(max_n):
                dot = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, w in cvec[n].items())
                sims.append(dot / (cnorm[n] * rnorm[n]) * penalty if cnorm[n] and rnorm[n] else 0.0)
            per_ref.append(np.mean(sims))
        scores.append(10.0 * float(np.mean(per_ref)))
    return float(np.mean(scores))


def caption_metrics(candidates: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    out = {"count": len(candidates)}
    for n in range(1, 5):
        out[f"bleu{n}"] = bleu(candidates, references, max_n=n)
    out["cider_d"] = cider(candidates, references)
    return out


# ------------------------------------------------------------------------------------ prompts

@dataclasses.dataclass
class _Item:
    """One prompt to answer; `soft` is its clip's media soft tokens (shared by the clip's items)."""
    index: int
    kind: str                       # 'qa' | 'caption'
    ids: list[int]                  # prompt ids, patch ids at the media positions
    media: tuple[str, ...]
    soft: jax.Array                 # [K, d_llm], K = the media's tokens in order


def default_loader_config(model: InferenceModel) -> "LoaderConfig":
    """The eval prompt format for a model loaded without its trainer config: its conversation
    style and media layout, stage-1 captions (no prompt, ending at a newline)."""
    from data_pipelines.loader import LoaderConfig

    return LoaderConfig(num_frames=model.num_frames, image_size=model.image_size,
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


def _frame_indices(example: Mapping, lc) -> np.ndarray:
    """The loader's eval sampling: `num_frames` uniform frames of a video's stored pool; an image's one."""
    if example["media"] == "video":
        return V.sample_indices(len(example["frames"]), lc.num_frames, "uniform")
    return np.zeros(1, np.int64)


def _clip_media(example: Mapping, idx: np.ndarray, lc, media: tuple[str, ...],
                where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The loader's eval transforms (resize, normalize): frames [T',S,S,3] (T' = num_frames for a
    video, 1 for an image) and, when `media` has audio, the fbank [M,1,128,204]."""
    frames = V.eval_transform(np.stack([decode_jpeg(example["frames"][i]) for i in idx]), lc.image_size)
    if "audio" not in media:
        return frames, None
    fbank = np.asarray(example["fbank"], np.float32)
    want = (lc.num_audio_clips, 1, 128, 204)
    if fbank.shape != want:
        raise EvalError(f"{where}: fbank shape {fbank.shape}, expected {want} (the model's audio clips)")
    return frames, fbank


def _soft_tokens(model: InferenceModel, media: tuple[str, ...], frames: np.ndarray, fbank: np.ndarray | None):
    """`[K, d_llm]`: each medium's soft tokens, concatenated in `media` order. One clip at a time,
    once for all its questions; an image is a 1-frame clip, as the reference encodes it."""
    from vllama_jax.chat import encode_media

    parts = []
    for m in media:
        x, method = (frames, "encode_video") if m == "video" else (fbank, "encode_audio")
        parts.append(encode_media(model.params, jnp.asarray(x)[None], config=model.config, method=method)[0])
    return jnp.concatenate(parts, axis=0)


def _qa_pairs(turns: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    return [(h["value"], g["value"]) for h, g in zip(turns, turns[1:])
            if h["from"] == "human" and g["from"] == "gpt"]


def _show_prompt(text: str, k: int) -> str:
    """The prompt text for the report, its run of placeholders written once with a count."""
    return text.replace(IMAGE_PLACEHOLDER * k, f"{IMAGE_PLACEHOLDER}x{k}", 1)


def qa_prompt(question: str, example_media: str, num_media_tokens: int, conv_style: str,
              time_msg: str = "", where: str = "") -> str:
    """A single-turn prompt for `question` about the record's media, cut where the answer starts."""
    turns = P.insert_media([{"from": "human", "value": question}], example_media, num_media_tokens,
                           time_msg, where)
    if conv_style == "vicuna":
        return P.vicuna_text(turns)[0] + "Assistant:"
    if conv_style == "llama_v2":
        return P.llama2_text(turns, where=where)
    raise EvalError(f"conv_style must be one of {P.CONV_STYLES}, got {conv_style!r}")


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
        ids, _ = P.tokenize_caption("", encoder, k, caption_prompt, "", lc.max_txt_len)
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
    caption_prompt = P.caption_prompt(lc.caption_prompts, lc.caption_template, None)
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
        idx = _frame_indices(example, lc)
        times = np.asarray(example["frame_times"], np.float32)[idx]
        soft = None
        time_msg = P.video_time_message(times) if example["media"] == "video" and lc.video_time_msg else ""
        prompts = _record_prompts(example, k, lc, encoder, kinds, questions, caption_prompt, time_msg, where)
        for kind, ids, text, info in prompts:
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
                soft = _soft_tokens(model, chosen, *_clip_media(example, idx, lc, chosen, where))
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


def score_examples(examples: Sequence[dict], choices=None, groups=None) -> dict:
    """Aggregate metrics of a report's examples; marks each QA example `correct`."""
    choices = synthetic.ATTRIBUTES if choices is None else choices
    qa = [e for e in examples if e["kind"] == "qa"]
    caps = [e for e in examples if e["kind"] == "caption"]
    metrics: dict[str, Any] = {}
    if qa:
        metrics["qa"] = qa_accuracy([e["answer"] for e in qa], [e["reference"] for e in qa])
    by_clip: dict[str, tuple[dict, dict]] = {}
    for e in qa:
        if e["attribute"] is not None and e["attribute"] in choices:
            ans, lab = by_clip.setdefault(e["id"], ({}, {}))
            ans[e["attribute"]], lab[e["attribute"]] = e["answer"], e["label"]
            e["correct"] = parse_choice(e["answer"], choices[e["attribute"]]) == e["label"]
        else:
            e["correct"] = normalize_answer(e["answer"]) == normalize_answer(e["reference"])
    if by_clip:
        answers, labels = zip(*by_clip.values())
        metrics["attributes"] = score_attributes(answers, labels, choices, groups)
    if caps:
        metrics["captions"] = caption_metrics([e["answer"] for e in caps], [e["reference"] for e in caps])
    return metrics


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


def format_summary(report: dict) -> str:
    """The metrics as a small text table."""
    m = report["metrics"]
    lines = []
    if "attributes" in m:
        lines.append(f"{'attribute':<12}{'accuracy':>10}{'chance':>8}{'majority':>10}{'unparsed':>10}{'n':>6}")
        for attr, s in m["attributes"]["per_attribute"].items():
            lines.append(f"{attr:<12}{s['accuracy']:>10.1%}{s['chance']:>8.0%}{s['majority']:>10.1%}"
                         f"{s['unparsed']:>10d}{s['total']:>6d}")
        for name, g in m["attributes"]["groups"].items():
            lines.append(f"{name + ' (mean)':<12}{g['accuracy']:>10.1%}{g['chance']:>8.0%}")
    if "qa" in m:
        lines.append(f"QA: exact {m['qa']['exact']:.1%}, contains {m['qa']['contains']:.1%} (n={m['qa']['count']})")
    if "captions" in m:
        c = m["captions"]
        lines.append(f"captions (n={c['count']}): " + ", ".join(f"BLEU-{n} {c[f'bleu{n}']:.3f}" for n in range(1, 5))
                     + f", CIDEr-D {c['cider_d']:.3f}")
    t = report.get("timing", {})
    if t:
        lines.append(f"{len(report['examples'])} answers in {t['wall_s']:.1f} s ({t['items_per_s']:.2f}/s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI

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
    p.add_argument("--conv-style", choices=P.CONV_STYLES, default=None)
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
    from vllama_jax.inference import LoadError, load_for_inference, load_train_config

    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        train_config = None
        config = args.config
        if isinstance(config, str) and config.endswith(".py"):
            loaded = load_train_config(config)
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
