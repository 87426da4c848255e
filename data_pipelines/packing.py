"""Packed batches: several examples per row, each with its own media, as a grain transformation.

Instruction dialogues run from tens to hundreds of tokens; padding every row to `seq_len` spends
most of a stage-2 step on pads. `PackedBatchIterDataset` replaces `.batch(B)`: it takes the
loader's padded rows one by one and places each in the first of the batch's B rows that still has
room for its tokens and a free example slot (at most E = `max_examples` per row); an example that
fits nowhere is held for the next batch, which is emitted when full or when `lookahead` examples
are held.

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

Checkpointing: the iterator's state is its parent's state before the oldest example it holds back
plus which later-read examples it already emitted, so `set_state` re-reads the held examples,
drops the emitted ones, and the batches that follow are exactly the ones an uninterrupted
iterator would have produced.
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
    """`parent` (an IterDataset of padded loader rows) -> packed batches of `batch_size` rows.

    An example that fits no row of the batch being built is held back for the next batch; the batch
    is emitted when its rows are full or `lookahead` examples are held. Examples are emitted in a
    different order than read, deterministically (a function of the parent's sequence alone).
    """

    def __init__(self, parent, batch_size: int, seq_len: int, max_examples: int, pad_id: int,
                 drop_remainder: bool = True, lookahead: int = 8):
        super().__init__(parent)
        if min(batch_size, seq_len, max_examples, lookahead) < 1:
            raise ValueError(f"packing needs positive batch_size, seq_len, max_examples, lookahead; got "
                             f"{batch_size}, {seq_len}, {max_examples}, {lookahead}")
        self.batch_size, self.seq_len, self.max_examples = batch_size, seq_len, max_examples
        self.pad_id, self.drop_remainder, self.lookahead = pad_id, drop_remainder, lookahead

    def __iter__(self):
        return PackedBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return (f"PackedBatchIterDataset(batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"max_examples={self.max_examples}, lookahead={self.lookahead})")


class PackedBatchIterator(_grain().DatasetIterator):
    """State: the parent's state before the oldest held example, and which of the examples read
    after it were already emitted (`skip`, read offsets from there): restoring re-reads the held
    examples, drops the emitted ones, and continues exactly as the saved iterator would have."""

    def __init__(self, parent, spec: PackedBatchIterDataset):
        super().__init__(parent)
        self._spec = spec
        self._held: list[tuple[int, dict, dict]] = []   # (read number, parent state before it, example)
        self._reads = 0                                 # read number of the next parent element
        self._emitted: set[int] = set()                 # read numbers emitted after the oldest held one
        self._skip: set[int] = set()                    # read numbers to drop after set_state
        self._exhausted = False

    def _read(self):
        """(read number, parent state before it, example), skipping already-emitted ones."""
        while True:
            state = copy.deepcopy(self._parent.get_state())
            example = next(self._parent)
            n, self._reads = self._reads, self._reads + 1
            if n in self._skip:
                self._skip.discard(n)
                self._emitted.add(n)
                continue
            return n, state, example

    def __next__(self) -> dict[str, np.ndarray]:
        s = self._spec
        examples, rows, placed = [], [], []
        used, counts = [0] * s.batch_size, [0] * s.batch_size
        queue, held = list(self._held), []

        def full():
            return all(c >= s.max_examples or u >= s.seq_len for u, c in zip(used, counts))

        while len(held) < s.lookahead and not full():
            if queue:
                item = queue.pop(0)
            elif self._exhausted:
                break
            else:
                try:
                    item = self._read()
                except StopIteration:
                    self._exhausted = True
                    break
            r = first_fit(used, counts, example_length(item[2]), s.seq_len, s.max_examples)
            if r is None:
                held.append(item)
                continue
            used[r] += example_length(item[2])
            counts[r] += 1
            examples.append(item[2])
            rows.append(r)
            placed.append(item[0])
        self._held = held + queue
        if not examples or (self._exhausted and s.drop_remainder and not full()):
            self._held = []   # drop_remainder: the data ran out before this batch filled
            raise StopIteration
        oldest = self._held[0][0] if self._held else self._reads
        self._emitted = {n for n in self._emitted | set(placed) if n > oldest}
        return pack_batch(examples, rows, s.batch_size, s.seq_len, s.max_examples, s.pad_id)

    def get_state(self) -> dict[str, Any]:
        if not self._held:
            # Skips still pending after a restore lie ahead of the parent's current position.
            return {"parent": copy.deepcopy(self._parent.get_state()),
                    "skip": sorted(n - self._reads for n in self._skip)}
        first, state, _ = self._held[0]
        skip = sorted(n - first for n in self._emitted | self._skip if n > first)
        return {"parent": copy.deepcopy(state), "skip": skip}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._held, self._emitted, self._exhausted = [], set(), False
        self._reads, self._skip = 0, set(int(n) for n in state.get("skip", ()))

    def __str__(self) -> str:
        return f"PackedBatchIterator({self._spec})"
