"""Video-LLaMA prompt templates, media placeholder expansion and loss targets.

Pure functions on strings and token lists. They reproduce the reference token sequences
(DAMO-NLP-SG/Video-LLaMA) including its quirks, because a model fine-tuned from the released
checkpoints must see what they were trained on:

caption (`video_llama.py: forward`, non-'multi' branch):
    ids = [bos] + tok(p_before) + [patch]*n + tok(p_after) + tok(caption + end_sym)[:max_txt_len]
  where `prompt.split('<ImageHere>') = (p_before, p_after)` and pieces are tokenized separately
  without BOS; with no prompt (stage 1) both pieces are empty. Targets: -100 on bos, prompt and
  patches; caption ids as labels, except ids equal to pad (= unk = 0), also -100.
vicuna (`preprocess` + `_mask_targets`):
    text = "\\n\\n" + "".join("###" + role + ": " + value + "\\n") + "###", roles Human/Assistant,
  tokenized once with BOS (truncated to 512). The mask is computed from the lengths of the header
  and each turn *tokenized on its own, each with its own BOS* (non-pad tokens counted): the
  header span is -100, then every human turn is -100 except its first 2 positions. Because each
  piece adds a BOS (and a "▁" prefix) the mask drifts right by a token or two per turn; the
  reference trained with that drift, so it is kept. `aligned=True` applies the same rule with
  each piece's length *in the conversation* (no drift), for models trained from scratch: with
  one-word answers the drift leaves every answer after the first two turns untrained.
llama_v2 (`preprocess_for_llama_v2`, `Conversation.get_prompt` LLAMA_2 style, system " "):
    text = "[INST] <<SYS>>\\n \\n<</SYS>>\\n\\n{q1} [/INST] {a1} </s><s>[INST] {q2} [/INST] {a2} </s>"
  tokenized with BOS. Target: position 0 masked; per round (split on "</s>") the first
  len(tok(round_up_to_"[/INST] ")) - 2 positions are masked and the cursor advances by
  len(tok(round)); everything past the last round is masked.

Media placeholders: one `<ImageHere>` in the text becomes `num_media_tokens` patch tokens inside
the reference's wrapper: images `<Image>{patches}</Image>` in place of the placeholder (LLaVA),
videos `<Video>{patches}</Video> ` + time message prepended to the first human turn (VideoChat).
"""
from __future__ import annotations

import re
from typing import Protocol, Sequence

import numpy as np

from data_pipelines.records import IMAGE_PLACEHOLDER

IGNORE_INDEX = -100
CONV_STYLES = ("vicuna", "llama_v2")
MEDIA_KINDS = ("video", "image")
# The reference's `tokenizer(..., max_length=512, truncation=True)` for conversations.
DEFAULT_MAX_CONV_LEN = 512

VICUNA_CAPTION_TEMPLATE = "###Human: {} ###Assistant: "
LLAMA2_CAPTION_TEMPLATE = "[INST] <<SYS>>\n \n<</SYS>>\n\n{} [/INST] "
VICUNA_END_SYM = "###"
LLAMA2_END_SYM = "</s>"
STAGE1_END_SYM = "\n"

# prompts/alignment_image.txt of the reference (stage-2 image-caption prompts).
ALIGNMENT_IMAGE_PROMPTS = (
    "<Image><ImageHere></Image> Describe this image in detail.",
    "<Image><ImageHere></Image> Take a look at this image and describe what you notice.",
    "<Image><ImageHere></Image> Please provide a detailed description of the picture.",
    "<Image><ImageHere></Image> Could you describe the contents of this image for me?",
)

_VICUNA_ROLES = {"human": "Human", "gpt": "Assistant"}
_LLAMA2_SYSTEM = " "
_LLAMA2_INST_END = "[/INST] "


class PromptError(ValueError):
    """A conversation or caption cannot be turned into a Video-LLaMA prompt."""


class Encoder(Protocol):
    """What the prompt builders need from a tokenizer (see `tokenizer.TextEncoder`)."""
    bos_id: int
    pad_id: int
    patch_id: int

    def __call__(self, text: str, add_bos: bool = True, max_length: int | None = None) -> list[int]: ...


# ---------------------------------------------------------------------------- text preparation

def blip_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's `pre_caption`: lowercase, punctuation .!"()*#:;~ to spaces, squeeze, first `max_words`."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def load_prompt_file(path: str) -> tuple[str, ...]:
    """Prompt lines of a reference prompt file, keeping only those with an `<ImageHere>` (as it does)."""
    with open(path, encoding="utf-8") as f:
        prompts = tuple(line for line in f.read().splitlines() if IMAGE_PLACEHOLDER in line)
    if not prompts:
        raise PromptError(f"prompt file {path!r} has no line containing {IMAGE_PLACEHOLDER}")
    return prompts


def video_time_message(frame_times: Sequence[float]) -> str:
    """The reference's `load_video(..., return_msg=True)` message for the sampled frames."""
    sec = ", ".join(str(round(float(t), 1)) for t in frame_times)
    return f"The video contains {len(frame_times)} frames sampled at {sec} seconds. "


def media_wrapper(media: str, num_media_tokens: int) -> str:
    if media not in MEDIA_KINDS:
        raise PromptError(f"media must be one of {MEDIA_KINDS}, got {media!r}")
    tag = "Video" if media == "video" else "Image"
    return f"<{tag}>{IMAGE_PLACEHOLDER * num_media_tokens}</{tag}>"


def insert_media(turns: Sequence[dict], media: str, num_media_tokens: int, time_msg: str = "",
                 where: str = "") -> list[dict]:
    """Expands the conversation's single media placeholder into `num_media_tokens` patch tokens.

    Images: the placeholder is replaced in place by `<Image>..</Image>` (LLaVA); with no
    placeholder the wrapper and a newline are put before the first human turn. Videos: as the
    reference, `<Video>..</Video> ` + `time_msg` is prepended to the first human turn; a
    placeholder left in the text by the writer is removed with the whitespace after it.
    `where` names the example in errors.
    """
    turns = [dict(t) for t in turns]
    found = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns)
    if found > 1:
        raise PromptError(f"{where}: {found} {IMAGE_PLACEHOLDER} placeholders; one media per example is supported")
    human = [i for i, t in enumerate(turns) if t["from"] == "human"]
    if not human:
        raise PromptError(f"{where}: conversation has no human turn")
    wrapper = media_wrapper(media, num_media_tokens)
    if media == "image" and found:
        for t in turns:
            t["value"] = t["value"].replace(IMAGE_PLACEHOLDER, wrapper)
        return turns
    if media == "image":
        turns[human[0]]["value"] = wrapper + "\n" + turns[human[0]]["value"]
        return turns
    for t in turns:
        t["value"] = re.sub(re.escape(IMAGE_PLACEHOLDER) + r"\s*", "", t["value"])
    turns[human[0]]["value"] = wrapper + " " + time_msg + turns[human[0]]["value"]
    return turns


# ---------------------------------------------------------------------------- tokenization

def _nonpad_len(ids: Sequence[int], pad_id: int) -> int:
    """`tokenized.input_ids.ne(pad_token_id).sum()` of the reference's `_tokenize_fn`."""
    return sum(1 for i in ids if i != pad_id)


def vicuna_text(turns: Sequence[dict]) -> tuple[str, list[str]]:
    """(whole conversation, per-turn signalled pieces) of the reference's `_add_speaker_and_signal`."""
    pieces = ["###" + _VICUNA_ROLES.get(t["from"].lower(), "unknown") + ": " + t["value"] + "\n" for t in turns]
    return "\n\n" + "".join(pieces) + "###", pieces


def tokenize_vicuna(turns: Sequence[dict], encode: Encoder, max_length: int = DEFAULT_MAX_CONV_LEN,
                    aligned: bool = False) -> tuple[list[int], list[int]]:
    """`preprocess` of the reference: ids and targets of a `###Human/###Assistant` conversation;
    `aligned`: the mask without the reference's drift (module docstring)."""
    text, pieces = vicuna_text(turns)
    ids = encode(text, add_bos=True, max_length=max_length)
    targets = list(ids)
    if aligned:
        lengths = _lengths_in_context(ids, ["\n\n", *pieces], encode, max_length)
    else:
        lengths = [_nonpad_len(encode(p, add_bos=True, max_length=max_length), encode.pad_id)
                   for p in ["\n\n", *pieces]]
    cur = lengths[0]
    _mask(targets, 0, cur)
    for turn, n in zip(turns, lengths[1:]):
        if turn["from"] == "human":
            _mask(targets, cur + 2, cur + n)
        cur += n
    return ids, targets


def _lengths_in_context(ids: Sequence[int], pieces: Sequence[str], encode: Encoder, max_length: int) -> list[int]:
    """How many of `ids` (the pieces joined, tokenized with BOS) each piece takes: from the
    tokenized prefixes, which must be prefixes of `ids` (a tokenizer that merges across a piece
    boundary has no such split)."""
    lengths, before, prefix = [], 0, ""
    for piece in pieces:
        prefix += piece
        upto = encode(prefix, add_bos=True, max_length=max_length)
        n = min(_nonpad_len(upto, encode.pad_id), len(ids))
        if list(upto[:n]) != list(ids[:n]):
            raise PromptError("aligned targets: the tokenizer merges tokens across a turn boundary "
                              f"(after {prefix[-40:]!r})")
        lengths.append(n - before)
        before = n
    return lengths


def llama2_text(turns: Sequence[dict], system: str = _LLAMA2_SYSTEM, where: str = "") -> str:
    """`Conversation.get_prompt()` in LLAMA_2 style for a human/gpt alternating conversation."""
    turns = list(turns)
    if turns and turns[0]["from"] != "human":
        turns = turns[1:]  # the reference skips a leading non-human turn
    text = ""
    for i, t in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if t["from"] != expected:
            raise PromptError(f"{where}: turn {i} is from {t['from']!r}, llama_v2 needs alternating human/gpt")
        msg = t["value"]
        if not msg:
            continue
        if i == 0:
            msg = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + msg
        text += f"<s>[INST] {msg} [/INST]" if i % 2 == 0 else f" {msg} </s>"
    # str.lstrip strips a character set: the reference removes the first "<s>" this way.
    return text.lstrip("<s>")


def tokenize_llama2(turns: Sequence[dict], encode: Encoder, max_length: int = DEFAULT_MAX_CONV_LEN,
                    system: str = _LLAMA2_SYSTEM, where: str = "") -> tuple[list[int], list[int]]:
    """`preprocess_for_llama_v2` of the reference: ids and targets of an `[INST]` conversation."""
    text = llama2_text(turns, system, where)
    ids = encode(text, add_bos=True, max_length=max_length)
    targets = list(ids)
    cur = 1
    _mask(targets, 0, cur)
    for rnd in text.split("</s>"):
        if rnd == "":
            break
        parts = rnd.split(_LLAMA2_INST_END)
        if len(parts) != 2:
            break
        round_len = len(encode(rnd, add_bos=True))
        instruction_len = len(encode(parts[0] + _LLAMA2_INST_END, add_bos=True)) - 2
        _mask(targets, cur, cur + instruction_len)
        cur += round_len
    _mask(targets, cur, len(targets))
    return ids, targets


def tokenize_conversation(turns: Sequence[dict], encode: Encoder, style: str,
                          max_length: int = DEFAULT_MAX_CONV_LEN, where: str = "",
                          aligned: bool = False) -> tuple[list[int], list[int]]:
    """`aligned`: vicuna targets without the reference's drift (llama_v2's mask does not drift)."""
    if style == "vicuna":
        return tokenize_vicuna(turns, encode, max_length, aligned)
    if style == "llama_v2":
        return tokenize_llama2(turns, encode, max_length, where=where)
    raise PromptError(f"conversation style must be one of {CONV_STYLES}, got {style!r}")


def tokenize_caption(caption: str, encode: Encoder, num_media_tokens: int, prompt: str | None = None,
                     end_sym: str = STAGE1_END_SYM, max_txt_len: int = 32) -> tuple[list[int], list[int]]:
    """Caption example: [bos] + prompt-wrapped patches + caption tokens (see module docstring).

    `prompt` is already formatted with its template and holds exactly one `<ImageHere>`.
    """
    before, after = "", ""
    if prompt:
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise PromptError(f"caption prompt {prompt!r} must contain exactly one {IMAGE_PLACEHOLDER}")
        before, after = prompt.split(IMAGE_PLACEHOLDER)
    before_ids = encode(before, add_bos=False) if before else []
    after_ids = encode(after, add_bos=False) if after else []
    text_ids = encode(caption + end_sym, add_bos=False, max_length=max_txt_len)
    prefix = [encode.bos_id] + before_ids + [encode.patch_id] * num_media_tokens + after_ids
    targets = [IGNORE_INDEX] * len(prefix) + [IGNORE_INDEX if t == encode.pad_id else t for t in text_ids]
    return prefix + text_ids, targets


def _mask(targets: list[int], start: int, stop: int) -> None:
    """`target[start:stop] = IGNORE_INDEX` with Python slice semantics (the reference's)."""
    start, stop = max(start, 0), min(stop, len(targets))
    for i in range(start, stop):
        targets[i] = IGNORE_INDEX


# ---------------------------------------------------------------------------- fixed-shape rows

def pack_example(ids: Sequence[int], targets: Sequence[int], patch_id: int, pad_id: int, seq_len: int,
                 num_media_tokens: int, where: str = "") -> dict[str, np.ndarray]:
    """One batch row of length `seq_len`: patch ids become 0 + `media_mask`, padding is masked.

    Raises when the example does not carry exactly `num_media_tokens` consecutive patch tokens
    after truncation (the reference checks the same in `forward`).
    """
    if len(ids) != len(targets):
        raise PromptError(f"{where}: {len(ids)} ids but {len(targets)} targets")
    ids = np.asarray(ids[:seq_len], np.int64)
    targets = np.asarray(targets[:seq_len], np.int64)
    media = ids == patch_id
    positions = np.flatnonzero(media)
    if len(positions) != num_media_tokens:
        raise PromptError(f"{where}: {len(positions)} media tokens in the first {seq_len} positions, expected "
                          f"{num_media_tokens} (seq_len too small for the prompt, or a stray placeholder)")
    if num_media_tokens and positions[-1] - positions[0] != num_media_tokens - 1:
        raise PromptError(f"{where}: media tokens are not consecutive")
    n = len(ids)
    row_ids = np.full(seq_len, pad_id, np.int32)
    row_ids[:n] = np.where(media, 0, ids)
    row_targets = np.full(seq_len, IGNORE_INDEX, np.int32)
    row_targets[:n] = np.where(media, IGNORE_INDEX, targets)
    attention = np.zeros(seq_len, np.int32)
    attention[:n] = 1
    media_mask = np.zeros(seq_len, bool)
    media_mask[:n] = media
    return {"input_ids": row_ids, "attention_mask": attention, "targets": row_targets, "media_mask": media_mask}


def caption_prompt(prompts: Sequence[str], template: str, rng: np.random.Generator | None) -> str | None:
    """One prompt from `prompts` formatted with `template` (random with `rng`, else the first); None if empty."""
    if not prompts:
        return None
    i = int(rng.integers(len(prompts))) if rng is not None else 0
    return template.format(prompts[i])

