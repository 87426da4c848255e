"""Packed batches: several examples per row, each with its own media, as a grain transformation.

Instruction dialogues run from tens to hundreds of tokens; padding every row to `seq_len` spends
most of a stage-2 step on pads. `PackedBatchIterDataset` replaces `.batch(B)`: it takes the
loader's padded rows one by one and places each in the first of the batch's B rows that still has
room for its tokens and a free example slot (at most E = `max_examples` per row); the first
example that fits nowhere closes the batch and opens the next one.

Packed batch (B rows, E example slots per row, L = seq_len, K media tokens per example):
  input_ids, attention_mask, targets, media_mask   [B, L]  the examples' tokens one after another,
                                                           then pads (attention 0, targets -100)
  segment_ids     int32 [B, L]  j + 1 on the tokens of the row's j-th example, 0 on pads
  frames          [B, E, T, S, S, 3], frame_mask [B, E, T], audio [B, E, M, 1, 128, 204],
  audio_mask      [B, E]        slot j holds example j's media (zeros / False in empty slots)
  example_mask    bool [B, E]   slot holds an example (slots fill 0, 1, ...; the model splices
                                row r's soft tokens in slot order into its media positions)
  example_id      str [B, E]    only with keep_ids ('' in empty slots)

The model (`VideoLlama.embed_inputs`, `Llama(segment_ids=...)`) restarts RoPE positions per
segment, keeps attention inside a segment and drops the shifted label that would cross into the
next example, so the loss of a packed batch equals that of the same examples unpacked.

grain's own packers (`grain.experimental.FirstFitPackIterDataset`, ...) concatenate every feature
along its leading axis, which suits token features but not a fixed number of media slots per row
with a presence mask, hence this transformation.

Checkpointing: the iterator's state is its parent's state before the example it holds back (the
one that opened the next batch), so `set_state` re-reads that example and the batches that follow
are exactly the ones an uninterrupted iterator would have produced.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np

from data_pipelines.prompts import IGNORE_INDEX

TOKEN_KEYS = ("input_ids", "attention_mask", "targets", "media_mask")
SLOT_KEYS = ("frames", "frame_mask", "audio", "audio_mask")


def example_length(row: dict[str, np.ndarray]) -> int:
    """Real tokens of a loader row (its tokens come first, pads after)."""
    return int(np.asarray(row["attention_mask"]).sum())


def assign_rows(lengths: Sequence[int], batch_size: int, seq_len: int, max_examples: int) -> list[int]:
    """First-fit placement of examples (in order) into `batch_size` rows: the row index of each
    example, stopping (shorter result) at the first one that fits in no row."""
    used, counts, rows = [0] * batch_size, [0] * batch_size, []
    for n in lengths:
        r = first_fit(used, counts, n, seq_len, max_examples)
        if r is None:
            break
        used[r] += n
        counts[r] += 1
        rows.append(r)
    return rows


def first_fit(used: Sequence[int], counts: Sequence[int], n: int, seq_len: int, max_examples: int) -> int | None:
    if n > seq_len:
        raise ValueError(f"an example of {n} tokens cannot fit rows of seq_len {seq_len}")
    for r, (u, c) in enumerate(zip(used, counts)):
        if u + n <= seq_len and c < max_examples:
            return r
    return None


def pack_batch(examples: Sequence[dict[str, np.ndarray]], rows: Sequence[int], batch_size: int,
               seq_len: int, max_examples: int, pad_id: int) -> dict[str, np.ndarray]:
    """The packed batch (module docstring) of `examples` placed in `rows` (one row index each)."""
    if not examples:
        raise ValueError("pack_batch needs at least one example")
    b, e, first = batch_size, max_examples, examples[0]
    out = {
        "input_ids": np.full((b, seq_len), pad_id, np.int32),
        "attention_mask": np.zeros((b, seq_len), np.int32),
        "targets": np.full((b, seq_len), IGNORE_INDEX, np.int32),
        "media_mask": np.zeros((b, seq_len), bool),
        "segment_ids": np.zeros((b, seq_len), np.int32),
        "example_mask": np.zeros((b, e), bool),
    }
    slot_keys = [k for k in SLOT_KEYS if k in first] + (["example_id"] if "example_id" in first else [])
    for k in slot_keys:
        x = np.asarray(first[k])
        out[k] = np.zeros((b, e) + x.shape, x.dtype) if k != "example_id" else np.full((b, e), "", object)
    used, counts = [0] * b, [0] * b
    for ex, r in zip(examples, rows):
        n, j, start = example_length(ex), counts[r], used[r]
        if start + n > seq_len or j >= e:
            raise ValueError(f"row {r} cannot take an example of {n} tokens ({start} used, {j} examples)")
        for k in TOKEN_KEYS:
            out[k][r, start:start + n] = np.asarray(ex[k])[:n]
        out["segment_ids"][r, start:start + n] = j + 1
        out["example_mask"][r, j] = True
        for k in slot_keys:
            out[k][r, j] = ex[k]
        used[r], counts[r] = start + n, j + 1
    if "example_id" in out:
        out["example_id"] = out["example_id"].astype(str)
    return out


def _grain():
    import grain

    return grain


class PackedBatchIterDataset(_grain().IterDataset):
    """`parent` (an IterDataset of padded loader rows) -> packed batches of `batch_size` rows."""

    def __init__(self, parent, batch_size: int, seq_len: int, max_examples: int, pad_id: int,
                 drop_remainder: bool = True):
        super().__init__(parent)
        if batch_size < 1 or seq_len < 1 or max_examples < 1:
            raise ValueError(f"packing needs positive batch_size, seq_len, max_examples; got "
                             f"{batch_size}, {seq_len}, {max_examples}")
        self.batch_size, self.seq_len, self.max_examples = batch_size, seq_len, max_examples
        self.pad_id, self.drop_remainder = pad_id, drop_remainder

    def __iter__(self):
        return PackedBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return (f"PackedBatchIterDataset(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"max_examples={self.max_examples})")


class PackedBatchIterator(_grain().DatasetIterator):
    def __init__(self, parent, spec: PackedBatchIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._held: dict | None = None         # the example that opened the next batch
        self._held_state: dict | None = None   # the parent's state before it was read

    def __next__(self) -> dict[str, np.ndarray]:
        s = self._spec
        examples, rows = [], []
        used, counts = [0] * s.batch_size, [0] * s.batch_size
        exhausted = False
        while True:
            if self._held is not None:
                example, self._held, self._held_state = self._held, None, None
                state_before = None
            else:
                state_before = copy.deepcopy(self._parent.get_state())
                try:
                    example = next(self._parent)
                except StopIteration:
                    exhausted = True
                    break
            n = example_length(example)
            r = first_fit(used, counts, n, s.seq_len, s.max_examples)
            if r is None:
                # Opens the next batch; `state_before` is never None here (a held example always
                # fits the empty batch it starts).
                self._held, self._held_state = example, state_before
                break
            used[r] += n
            counts[r] += 1
            examples.append(example)
            rows.append(r)
        if not examples or (exhausted and s.drop_remainder):
            raise StopIteration
        return pack_batch(examples, rows, s.batch_size, s.seq_len, s.max_examples, s.pad_id)

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._held_state if self._held is not None else self._parent.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._held, self._held_state = None, None

    def __str__(self) -> str:
        return f"PackedBatchIterator({self._spec})"
