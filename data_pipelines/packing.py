"""Packed batches: several examples per row, media in a per-batch budget of slots, as a grain
transformation.

Instruction dialogues run from tens to hundreds of tokens; padding every row to `seq_len` spends
most of a stage-2 step on pads. `PackedBatchIterDataset` replaces `.batch(B)`: it takes the
loader's padded rows one by one and places each in the first of the batch's B rows that still has
room for its tokens while the batch still has a free media slot (N = `media_slots` per batch); an
example that fits nowhere is held for the next batch, which is emitted when no more examples fit
or when `lookahead` examples are held.

Packed batch (B rows, N media slots, L = seq_len, K media tokens per example):
  input_ids, attention_mask, targets, media_mask   [B, L]  the examples' tokens one after another,
                                                           then pads (attention 0, targets -100)
  segment_ids     int32 [B, L]  j + 1 on the tokens of the row's j-th example, 0 on pads
  frames          [N, T, S, S, 3], frame_mask [N, T], audio [N, M, 1, 128, 204], audio_mask [N]:
                  one example's media per slot (zeros / False in empty slots)
  example_mask    bool [N]      slot holds an example
  example_id      str [N]       only with keep_ids ('' in empty slots)

The frozen towers encode N slots, not one per row and example a row could hold: N is sized for
the examples a batch really holds (`LoaderConfig.media_per_batch`). Slot order is the order the
model splices soft tokens in: row-major over the batch's media positions. With G = `groups`
micro-batches (gradient accumulation takes rows g, g + G, ... as micro-batch g, and slots the
same way), row r's examples use slots s with s % G == r % G, so each micro-batch carries its own
media: the examples of rows r = g, g + G, ... in (row, position) order take slots g, g + G, ...

The model (`VideoLlama.embed_inputs`, `Llama(segment_ids=...)`) restarts RoPE positions per
segment, keeps attention inside a segment and drops the shifted label that would cross into the
next example, so the loss of a packed batch equals that of the same examples unpacked.

grain's own packers (`grain.experimental.FirstFitPackIterDataset`, ...) concatenate every feature
along its leading axis, which suits token features but not a fixed budget of media slots with a
presence mask, hence this transformation.

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


class Layout:
    """Where examples may go in one packed batch: B rows of L tokens, N media slots in G groups
    (row r and slot s belong to group r % G and s % G; each group has N / G slots)."""

    def __init__(self, batch_size: int, seq_len: int, media_slots: int, groups: int = 1):
        if min(batch_size, seq_len, media_slots, groups) < 1:
            raise ValueError(f"packing needs positive batch_size, seq_len, media_slots, groups; got "
                             f"{batch_size}, {seq_len}, {media_slots}, {groups}")
        if batch_size % groups or media_slots % groups:
            raise ValueError(f"packing into {groups} micro-batches (train.accum_steps) needs batch_size "
                             f"{batch_size} and media slots {media_slots} divisible by {groups}")
        self.batch_size, self.seq_len, self.media_slots, self.groups = batch_size, seq_len, media_slots, groups
        self.per_group = media_slots // groups

    def empty(self) -> tuple[list[int], list[int]]:
        """(tokens used per row, slots used per group) of an empty batch."""
        return [0] * self.batch_size, [0] * self.groups

    def first_fit(self, used: Sequence[int], taken: Sequence[int], n: int) -> int | None:
        """The first row with room for `n` tokens whose group has a free slot, or None."""
        if n > self.seq_len:
            raise ValueError(f"an example of {n} tokens cannot fit rows of seq_len {self.seq_len}")
        for r, u in enumerate(used):
            if u + n <= self.seq_len and taken[r % self.groups] < self.per_group:
                return r
        return None

    def full(self, used: Sequence[int], taken: Sequence[int]) -> bool:
        """No example of one token more could go anywhere."""
        return all(u >= self.seq_len or taken[r % self.groups] >= self.per_group for r, u in enumerate(used))

    def slots(self, rows: Sequence[int]) -> list[int]:
        return assign_slots(rows, self.groups)


def assign_slots(rows: Sequence[int], groups: int = 1) -> list[int]:
    """The media slot of each example placed (in this order) in `rows`: group g = row % groups
    takes slots g, g + groups, ... in (row, position in row) order."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i], i))
    nxt = list(range(groups))
    out = [0] * len(rows)
    for i in order:
        g = rows[i] % groups
        out[i] = nxt[g]
        nxt[g] += groups
    return out


def assign_rows(lengths: Sequence[int], layout: Layout) -> list[int]:
    """First-fit placement of examples (in order): the row index of each example, stopping
    (shorter result) at the first one that fits in no row or finds no free slot."""
    used, taken = layout.empty()
    rows = []
    for n in lengths:
        r = layout.first_fit(used, taken, n)
        if r is None:
            break
        used[r] += n
        taken[r % layout.groups] += 1
        rows.append(r)
    return rows


def pack_batch(examples: Sequence[dict[str, np.ndarray]], rows: Sequence[int], layout: Layout,
               pad_id: int) -> dict[str, np.ndarray]:
    """The packed batch (module docstring) of `examples` placed in `rows` (one row index each)."""
    if not examples:
        raise ValueError("pack_batch needs at least one example")
    b, n_slots, seq_len, first = layout.batch_size, layout.media_slots, layout.seq_len, examples[0]
    out = {
        "input_ids": np.full((b, seq_len), pad_id, np.int32),
        "attention_mask": np.zeros((b, seq_len), np.int32),
        "targets": np.full((b, seq_len), IGNORE_INDEX, np.int32),
        "media_mask": np.zeros((b, seq_len), bool),
        "segment_ids": np.zeros((b, seq_len), np.int32),
        "example_mask": np.zeros((n_slots,), bool),
    }
    slot_keys = [k for k in SLOT_KEYS if k in first] + (["example_id"] if "example_id" in first else [])
    for k in slot_keys:
        x = np.asarray(first[k])
        out[k] = np.zeros((n_slots,) + x.shape, x.dtype) if k != "example_id" else np.full((n_slots,), "", object)
    slots = layout.slots(rows)
    if len(set(slots)) != len(slots) or max(slots) >= n_slots:
        raise ValueError(f"{len(examples)} examples in rows {list(rows)} need more than the {n_slots} media slots")
    used, counts = [0] * b, [0] * b
    for ex, r, s in zip(examples, rows, slots):
        n, start = example_length(ex), used[r]
        if start + n > seq_len:
            raise ValueError(f"row {r} cannot take an example of {n} tokens ({start} used)")
        for k in TOKEN_KEYS:
            out[k][r, start:start + n] = np.asarray(ex[k])[:n]
        out["segment_ids"][r, start:start + n] = counts[r] + 1
        out["example_mask"][s] = True
        for k in slot_keys:
            out[k][s] = ex[k]
        used[r], counts[r] = start + n, counts[r] + 1
    if "example_id" in out:
        out["example_id"] = out["example_id"].astype(str)
    return out


def slot_of_segments(segment_ids: np.ndarray, groups: int = 1) -> dict[tuple[int, int], int]:
    """{(row, segment id): slot} of a packed batch (the inverse of the slot assignment)."""
    segment_ids = np.asarray(segment_ids)
    rows = [r for r in range(segment_ids.shape[0]) for _ in range(int(segment_ids[r].max(initial=0)))]
    segs = [j for r in range(segment_ids.shape[0]) for j in range(1, int(segment_ids[r].max(initial=0)) + 1)]
    return {(r, j): s for r, j, s in zip(rows, segs, assign_slots(rows, groups))}


def _grain():
    import grain

    return grain


class PackedBatchIterDataset(_grain().IterDataset):
    """`parent` (an IterDataset of padded loader rows) -> packed batches of `batch_size` rows.

    An example that fits no row of the batch being built is held back for the next batch; the batch
    is emitted when its rows are full or `lookahead` examples are held. Examples are emitted in a
    different order than read, deterministically (a function of the parent's sequence alone).
    """

    def __init__(self, parent, batch_size: int, seq_len: int, media_slots: int, pad_id: int,
                 drop_remainder: bool = True, lookahead: int = 8, groups: int = 1):
        super().__init__(parent)
        if lookahead < 1:
            raise ValueError(f"packing needs a positive lookahead, got {lookahead}")
        self.layout = Layout(batch_size, seq_len, media_slots, groups)
        self.pad_id, self.drop_remainder, self.lookahead = pad_id, drop_remainder, lookahead

    def __iter__(self):
        return PackedBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        lay = self.layout
        return (f"PackedBatchIterDataset(batch_size={lay.batch_size}, seq_len={lay.seq_len}, "
                f"media_slots={lay.media_slots}, groups={lay.groups}, lookahead={self.lookahead})")


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
        s, lay = self._spec, self._spec.layout
        examples, rows, placed = [], [], []
        used, taken = lay.empty()
        queue, held = list(self._held), []

        def full():
            return lay.full(used, taken)

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
            r = lay.first_fit(used, taken, example_length(item[2]))
            if r is None:
                held.append(item)
                continue
            used[r] += example_length(item[2])
            taken[r % lay.groups] += 1
            examples.append(item[2])
            rows.append(r)
            placed.append(item[0])
        self._held = held + queue
        if not examples or (self._exhausted and s.drop_remainder and not full()):
            self._held = []   # drop_remainder: the data ran out before this batch filled
            raise StopIteration
        oldest = self._held[0][0] if self._held else self._reads
        self._emitted = {n for n in self._emitted | set(placed) if n > oldest}
        return pack_batch(examples, rows, lay, s.pad_id)

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
