"""grain input pipeline: ArrayRecord shards -> fixed-shape Video-LLaMA model batches.

    per dataset:  ShardSource (ArrayRecord + records.decode_example)
                  -> shuffle (seeded, reshuffled every epoch) -> repeat(num_epochs)
                  -> ExampleTransform (random_map: frame sampling, crop/resize, prompt + targets)
    mixture:      MapDataset.mix(datasets, weights)  (deterministic weighted interleave)
    per process:  ProcessRows: this process' rows of each global batch of that global order
    then:         to_iter_dataset(read threads) -> batch -> optional mp_prefetch(worker processes)

The example order is global: every process builds the same one (same seeds) and takes its own
rows of each global batch, so the processes' batches are disjoint and together are the
one-process run's. Every random choice (shuffle order, headtail frames, crop, caption prompt) is
a function of the seed and the example's global position, so the loader's state is one global
position (`GlobalPositionLoader`: `{"global_examples", "global_batch_size"}`) and a resume replays
exactly the remaining batches, on any process count with the same global batch.
Packed batches (`pack=True`) are the exception: a row's contents depend on the examples read
before it, so each process packs its own shard (split before the shuffle) and its position is
grain's per-process state, resumable on the same process count only.

Batch (per process; `batch_size` rows), the contract with the model:
  frames          float32 [B,T,S,S,3] CLIP-normalized (S = image_size)
  frame_mask      bool [B,T]; videos: all True (short videos repeat frames as the reference's
                  sampling does); images: only frame 0 is valid, frames 1.. are zeros (the
                  reference feeds an image as a 1-frame clip, i.e. the video Q-Former must
                  ignore masked frames)
  audio           float32 [B,M,1,128,204] normalized fbank (zeros when absent)
  audio_mask      bool [B] audio_present
  input_ids       int32 [B,L]; 0 at media positions, pad id (LLaMA: 0) after the text
  attention_mask  int32 [B,L], 1 on every real position (media included)
  targets         int32 [B,L], HF convention (label of position i; the model shifts); -100 on
                  bos, prompt, media and padding
  media_mask      bool [B,L], exactly num_media_tokens consecutive True per row
  example_id      str [B] only with keep_ids=True (not for the device)
With `pack=True` rows hold several examples (`data_pipelines.packing`): the token fields as above
plus segment_ids [B,L], and frames / frame_mask / audio / audio_mask / example_id per media slot
[N,...] (N = media_per_batch) with example_mask [N].
Known differences from the reference: batches may mix datasets (the reference draws whole batches
from one dataset, LAVIS MultiIterLoader); the caption prompt is drawn per example (reference: per
batch); attention_mask is 1 on unk tokens too (reference: `input_ids != pad` = 0 there).
"""
from __future__ import annotations

import bisect
import dataclasses
import glob
import os
from typing import Any, Iterable, Sequence

import numpy as np

from data_pipelines import prompts
from data_pipelines import video
from data_pipelines.records import RecordError, decode_example, decode_jpeg
from data_pipelines.tokenizer import TextEncoder
from vllama_jax.cli_errors import UserError
from vllama_jax.models.common import Preset

FRAME_SAMPLINGS = ("auto", "uniform", "headtail")
CAPTION_PROCESSORS = ("blip", "none")


class LoaderError(ValueError):
    """Bad loader input: a missing shard, a corrupt record, an example that breaks the prompt rules."""


# ---------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a mixture.

    paths: ArrayRecord files or glob patterns (TFDS shards included). frame_sampling: 'auto' is
    headtail for training captions (WebVid stage 1) and uniform otherwise (instruction data,
    eval), as the reference. caption_processor: 'blip' lowercases and strips punctuation (the
    reference's blip_caption text processor; its cc_sbu_align dataset skipped it: use 'none').
    """
    paths: tuple[str, ...]
    weight: float = 1.0
    name: str = ""
    frame_sampling: str = "auto"
    caption_processor: str = "blip"

    def __post_init__(self):
        if isinstance(self.paths, (str, os.PathLike)):
            object.__setattr__(self, "paths", (os.fspath(self.paths),))
        if self.frame_sampling not in FRAME_SAMPLINGS:
            raise LoaderError(f"frame_sampling must be one of {FRAME_SAMPLINGS}, got {self.frame_sampling!r}")
        if self.caption_processor not in CAPTION_PROCESSORS:
            raise LoaderError(f"caption_processor must be one of {CAPTION_PROCESSORS}, got {self.caption_processor!r}")
        if not self.weight > 0:
            raise LoaderError(f"dataset {self.name or self.paths}: weight must be > 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class LoaderConfig(Preset):
    """Per-process batch layout, prompt style and pipeline knobs. Presets: stage1, stage2_vicuna,
    stage2_llama_v2 (the reference's train configs) and tiny (tests)."""
    batch_size: int = 32             # rows per process
    seq_len: int = 80                # L; stage 1: 1 bos + 32 media + 32 caption tokens fit
    num_frames: int = 8
    image_size: int = 224
    num_media_tokens: int = 32       # 32 video query tokens (+8 if audio tokens share the placeholder)
    num_audio_clips: int = 8
    conv_style: str = "vicuna"
    max_conv_len: int = prompts.DEFAULT_MAX_CONV_LEN
    aligned_targets: bool = False    # vicuna targets without the reference's drift (prompts.tokenize_vicuna)
    max_txt_len: int = 32            # caption tokens (incl. end_sym)
    caption_prompts: tuple[str, ...] = ()     # empty: no prompt (stage 1)
    caption_template: str = prompts.VICUNA_CAPTION_TEMPLATE
    end_sym: str = prompts.STAGE1_END_SYM
    video_time_msg: bool = True      # "The video contains 8 frames sampled at ..." in video conversations
    train: bool = True               # random crop + headtail; False: resize + uniform, first prompt
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None    # None: repeat forever
    drop_remainder: bool = True
    read_threads: int = 2            # grain ReadOptions.num_threads (per process / worker)
    prefetch_buffer_size: int = 16   # elements read ahead by those threads
    worker_count: int = 0            # >0: mp_prefetch worker processes
    worker_buffer_size: int = 2      # batches each worker holds ready
    keep_ids: bool = False
    # Several examples per row (`data_pipelines.packing`), segment ids keeping them apart; their
    # media go in `media_per_batch` slots per batch ([N, ...], 0: 2 x batch_size), which the frozen
    # towers encode (empty ones too): size N for the examples a batch holds. `pack_groups`: the
    # micro-batches the trainer splits a batch into (train.accum_steps), each with its own slots.
    pack: bool = False
    media_per_batch: int = 0
    pack_groups: int = 1

    @classmethod
    def presets(cls):
        return LOADER_PRESETS

    def __post_init__(self):
        if self.conv_style not in prompts.CONV_STYLES:
            raise LoaderError(f"conv_style must be one of {prompts.CONV_STYLES}, got {self.conv_style!r}")
        for name in ("batch_size", "seq_len", "num_frames", "image_size", "num_media_tokens", "max_txt_len",
                     "pack_groups"):
            if getattr(self, name) < 1:
                raise LoaderError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.media_per_batch < 0:
            raise LoaderError(f"media_per_batch must be >= 0 (0: 2 x batch_size), got {self.media_per_batch}")
        if self.pack and (self.batch_size % self.pack_groups or self.media_slots % self.pack_groups):
            raise LoaderError(f"packed batches of {self.batch_size} rows and {self.media_slots} media slots do not "
                              f"split into {self.pack_groups} micro-batches (train.accum_steps)")

    @property
    def media_slots(self) -> int:
        """Media slots of a packed batch (this process')."""
        return self.media_per_batch or 2 * self.batch_size


LOADER_PRESETS = {
    "stage1": LoaderConfig(),
    "stage2_vicuna": LoaderConfig(batch_size=4, seq_len=512, max_txt_len=320, end_sym=prompts.VICUNA_END_SYM,
                                  caption_prompts=prompts.ALIGNMENT_IMAGE_PROMPTS),
    "stage2_llama_v2": LoaderConfig(batch_size=4, seq_len=512, max_txt_len=320, conv_style="llama_v2",
                                    end_sym=prompts.LLAMA2_END_SYM, caption_template=prompts.LLAMA2_CAPTION_TEMPLATE,
                                    caption_prompts=prompts.ALIGNMENT_IMAGE_PROMPTS),
    "tiny": LoaderConfig(batch_size=2, seq_len=48, num_frames=4, image_size=32, num_media_tokens=4,
                         max_txt_len=16, read_threads=1, prefetch_buffer_size=4),
}


# ---------------------------------------------------------------------------- source

def expand_paths(paths: Iterable[str]) -> list[str]:
    """Files named by `paths` (globs expanded, sorted); errors name the path that matched nothing."""
    out = []
    for p in paths:
        p = os.fspath(p)
        if glob.has_magic(p):
            matches = sorted(glob.glob(p))
            if not matches:
                raise LoaderError(f"shard pattern {p!r} matches no file")
            out.extend(matches)
        elif not os.path.isfile(p):
            raise LoaderError(f"shard file {p!r} does not exist")
        else:
            out.append(p)
    if not out:
        raise LoaderError("no shard paths given")
    return out


class ShardSource:
    """Random-access source over ArrayRecord files yielding decoded examples.

    Each example gets `_where` = "path[record]" so later failures can name the record.
    """

    def __init__(self, paths: Sequence[str]):
        from grain.sources import ArrayRecordDataSource

        self.paths = expand_paths(paths)
        self._files = []
        for p in self.paths:
            try:
                self._files.append(ArrayRecordDataSource([p]))
            except Exception as e:  # array_record raises RuntimeError/ValueError with C++ messages
                raise LoaderError(f"shard {p!r} is not a readable ArrayRecord file: {e}") from e
        self._ends = list(np.cumsum([len(f) for f in self._files]))

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, record number in that file) of a global record index."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range [0, {len(self)})")
        f = bisect.bisect_right(self._ends, index)
        return f, index - int(self._ends[f - 1] if f else 0)

    def __getitem__(self, index: int) -> dict[str, Any]:
        f, pos = self.locate(int(index))
        where = f"{self.paths[f]}[{pos}]"
        try:
            data = self._files[f][pos]
            example = decode_example(data)
        except (RecordError, ValueError, RuntimeError) as e:
            raise LoaderError(f"record {where}: {e}") from e
        example["_where"] = where
        return example


# ---------------------------------------------------------------------------- per-example transform

def _frame_sampling(spec: DatasetSpec, config: LoaderConfig, kind: str) -> str:
    if spec.frame_sampling != "auto":
        return spec.frame_sampling
    return "headtail" if config.train and kind == "caption" else "uniform"


def frame_indices(example: dict, num_frames: int, sampling: str = "uniform",
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Which stored frames a record shows: `num_frames` of a video's stored pool (`sampling`), an image's one."""
    if example["media"] == "video":
        return video.sample_indices(len(example["frames"]), num_frames, sampling, rng)
    return np.zeros(1, np.int64)


def frame_pixels(example: dict, idx: np.ndarray, image_size: int, rng: np.random.Generator | None = None,
                 train: bool = False) -> np.ndarray:
    """The frames `idx` as the model sees them, float32 [len(idx), S, S, 3]: resized and CLIP-normalised,
    after a random resized crop when `train`. The trainer's rows (ExampleTransform) and the eval's
    clips (vllama_jax.evaluate.runner) both get their pixels here."""
    raw = np.stack([decode_jpeg(example["frames"][i]) for i in idx])
    if train:
        return video.train_transform(raw, rng, image_size, squash=example["media"] == "video")
    return video.eval_transform(raw, image_size)


def stored_fbank(example: dict, num_audio_clips: int, where: str) -> np.ndarray:
    """A record's fbank clips float32 [M, 1, 128, 204]; LoaderError unless M is `num_audio_clips`."""
    fbank = np.asarray(example["fbank"], np.float32)
    want = (num_audio_clips, 1, 128, 204)
    if fbank.shape != want:
        raise LoaderError(f"{where}: fbank shape {fbank.shape}, expected {want} (config.data.num_audio_clips "
                          f"= {want[0]}; vllama-prepare-data --audio-clips sets what shards store)")
    return fbank


class ExampleTransform:
    """Decoded record -> one batch row (numpy). A grain RandomMap: `random_map(example, rng)`."""

    def __init__(self, config: LoaderConfig, spec: DatasetSpec, encoder: TextEncoder):
        self.config, self.spec, self.encoder = config, spec, encoder

    def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        where = f"record {example.get('id', '?')!r} ({example.get('_where', '?')})"
        try:
            return self._transform(example, rng, where)
        except (LoaderError, prompts.PromptError) as e:
            raise LoaderError(str(e) if where in str(e) else f"{where}: {e}") from e
        except (RecordError, ValueError) as e:
            raise LoaderError(f"{where}: {e}") from e

    def _frames(self, example, rng, sampling):
        cfg = self.config
        idx = frame_indices(example, cfg.num_frames, sampling, rng)
        pix = frame_pixels(example, idx, cfg.image_size, rng, cfg.train)
        frames = np.zeros((cfg.num_frames, cfg.image_size, cfg.image_size, 3), np.float32)
        frames[:len(pix)] = pix
        mask = np.zeros(cfg.num_frames, bool)
        mask[:len(pix)] = True
        times = np.asarray(example["frame_times"], np.float32)[idx]
        return frames, mask, times

    def _audio(self, example, where):
        return stored_fbank(example, self.config.num_audio_clips, where)

    def _text(self, example, rng, times, where):
        cfg, enc = self.config, self.encoder
        if example["kind"] == "caption":
            caption = example["caption"]
            if self.spec.caption_processor == "blip":
                caption = prompts.blip_caption(caption)
            prompt = prompts.caption_prompt(cfg.caption_prompts, cfg.caption_template, rng if cfg.train else None)
            return prompts.tokenize_caption(caption, enc, cfg.num_media_tokens, prompt, cfg.end_sym, cfg.max_txt_len)
        msg = prompts.video_time_message(times) if example["media"] == "video" and cfg.video_time_msg else ""
        turns = prompts.insert_media(example["conversations"], example["media"], cfg.num_media_tokens, msg, where)
        return prompts.tokenize_conversation(turns, enc, cfg.conv_style, cfg.max_conv_len, where,
                                             cfg.aligned_targets)

    def _transform(self, example, rng, where):
        cfg = self.config
        frames, frame_mask, times = self._frames(example, rng, _frame_sampling(self.spec, cfg, example["kind"]))
        audio = self._audio(example, where)
        ids, targets = self._text(example, rng, times, where)
        row = prompts.pack_example(ids, targets, self.encoder.patch_id, self.encoder.pad_id, cfg.seq_len,
                                   cfg.num_media_tokens, where)
        row.update(frames=frames, frame_mask=frame_mask, audio=audio,
                   audio_mask=np.asarray(bool(example["audio_present"])))
        if cfg.keep_ids:
            row["example_id"] = np.asarray(example["id"])
        return row


# ---------------------------------------------------------------------------- pipeline

def _as_specs(datasets) -> list[DatasetSpec]:
    if isinstance(datasets, DatasetSpec):
        return [datasets]
    if isinstance(datasets, (str, os.PathLike)):
        return [DatasetSpec(paths=(os.fspath(datasets),))]
    specs = [d if isinstance(d, DatasetSpec) else DatasetSpec(paths=(os.fspath(d),)) for d in datasets]
    if not specs:
        raise LoaderError("no datasets given")
    return specs


def process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """(index, count) of this process' rows of each global batch; defaults to jax's process index / count."""
    if shard_index is None and shard_count is None:
        import grain

        opts = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        return opts.shard_index, opts.shard_count
    if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
        raise LoaderError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    return shard_index, shard_count


def shard_dataset(ds, shard_index: int, shard_count: int, drop_remainder: bool = True):
    """This shard's slice of a MapDataset; equal sizes across shards when drop_remainder (so no
    process runs out of batches before the others and hangs a collective). The packed pipeline's
    split (its rows are not a function of a global example position)."""
    if drop_remainder:
        ds = ds[: len(ds) - len(ds) % shard_count]
    return ds[shard_index::shard_count]


def check_shard_geometry(source: ShardSource, config: LoaderConfig, name: str = "") -> None:
    """The first record's stored media against the config, before any batch: a fbank written with
    another clip count would otherwise fail the first transform of each such record."""
    if not len(source):
        return
    example = source[0]
    clips = np.shape(example.get("fbank", ()))
    if clips and clips[0] != config.num_audio_clips:
        raise LoaderError(
            f"dataset {name or source.paths[0]}: shards store {clips[0]} audio clips per example "
            f"(fbank {tuple(clips)}, {example['_where']}) but config.data.num_audio_clips = "
            f"{config.num_audio_clips}: set --config.data.num_audio_clips={clips[0]} or rewrite the shards with "
            f"`vllama-prepare-data ... --audio-clips {config.num_audio_clips}`")


def make_example_dataset(spec: DatasetSpec, config: LoaderConfig, encoder: TextEncoder,
                         shard_index: int, shard_count: int, seed: int):
    """grain.MapDataset of transformed rows for one dataset (split, shuffled, repeated). The
    unpacked pipeline calls it with one shard (the global order, split into rows afterwards by
    `ProcessRows`); the packed one with this process' shard."""
    import grain

    source = ShardSource(spec.paths)
    check_shard_geometry(source, config, spec.name)
    ds = shard_dataset(grain.MapDataset.source(source), shard_index, shard_count, config.drop_remainder)
    if len(ds) == 0:
        raise LoaderError(f"dataset {spec.name or spec.paths}: shard {shard_index}/{shard_count} is empty "
                          f"({len(source)} records)")
    if config.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(config.num_epochs)
    # random_map seeds each element by its index here: in the global order, an example gets the same
    # crop, frames and prompt whatever the process count.
    return ds.random_map(ExampleTransform(config, spec, encoder), seed=seed + 1)


def _mixture(specs, config: LoaderConfig, encoder: TextEncoder, shard_index: int, shard_count: int):
    import grain

    # Distinct, fixed seeds per dataset so adding a dataset does not reorder the others.
    parts = [make_example_dataset(s, config, encoder, shard_index, shard_count,
                                  seed=(config.seed * 1_000_003 + 7919 * k) % 2**31)
             for k, s in enumerate(specs)]
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in specs])


class ProcessRows:
    """Process `index`'s rows of each global batch of a global example order, as a random-access
    sequence: its local example j is global example (j // b) * G + index * b + j % b, where b is
    the per-process batch and G = count * b the global one. Every process reads the same global
    order (same seeds, same per-example randomness), so the processes' batches are disjoint and
    together are exactly the one-process run's global batches, for any process count."""

    def __init__(self, examples, index: int, count: int, batch_size: int, drop_remainder: bool = True):
        self.examples, self.index, self.count, self.batch_size = examples, index, count, batch_size
        n, g = len(examples), count * batch_size
        full, rest = divmod(n, g)
        self._len = full * batch_size + (0 if drop_remainder else min(max(rest - index * batch_size, 0), batch_size))

    def __len__(self) -> int:
        return self._len

    def global_index(self, j: int) -> int:
        b = self.batch_size
        return (j // b) * self.count * b + self.index * b + j % b

    def __getitem__(self, j: int):
        if not 0 <= j < self._len:
            raise IndexError(f"row {j} out of range [0, {self._len})")
        return self.examples[self.global_index(j)]


class LoaderStateError(LoaderError, UserError):
    """A data position this loader cannot resume from (another format, another global batch): the
    user's choice to make, not checkpoint damage (`Checkpointer.restore_newest` passes it through)."""


class GlobalPositionLoader:
    """The unpacked loader's iterator: batches of this process' rows (`ProcessRows`) with a state
    that is one position in the global example order, `{"global_examples": n, "global_batch_size":
    G}`, the same on every process. So it resumes on any process count (`state_is_global`, read by
    `vllama_jax.checkpoint`): each process re-derives its rows from n. (grain's own iterator state
    is an index into one process' slice of the data and its checkpoint handler keeps one file per
    process; neither carries over to another count.)"""

    state_is_global = True

    def __init__(self, rows, config: LoaderConfig, make_iter):
        self._rows, self._config, self._make_iter = rows, config, make_iter
        self.global_batch_size = rows.count * config.batch_size
        self._batches = 0
        self._it = make_iter(0)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self._batches += 1
        return batch

    def get_state(self) -> dict:
        return {"global_examples": self._batches * self.global_batch_size,
                "global_batch_size": self.global_batch_size}

    def set_state(self, state) -> None:
        if not isinstance(state, dict) or "global_examples" not in state:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise LoaderStateError(
                f"data iterator state {found} is not this loader's (expected {{'global_examples', "
                f"'global_batch_size'}}): it was written by an older vllama_jax whose positions were per "
                f"process; restart the data from the beginning (a new workdir, or --config.train.resume=False "
                f"keeping the params via paths.init_ckpt), or resume with that version")
        n, g = int(state["global_examples"]), int(state.get("global_batch_size", 0))
        if g != self.global_batch_size:
            raise LoaderStateError(
                f"data position was saved with a global batch of {g} examples, this run's is "
                f"{self.global_batch_size} ({self._rows.count} process(es) x {self._config.batch_size}): "
                f"keep config.train.batch_size to resume at the same example")
        if n % g:
            raise LoaderStateError(f"data position {n} is not a whole number of global batches of {g}")
        self._close_inner()
        self._batches = n // g
        self._it = self._make_iter(self._batches * self._config.batch_size)

    def start_prefetch(self) -> None:
        if hasattr(self._it, "start_prefetch"):
            self._it.start_prefetch()

    def _close_inner(self) -> None:
        if hasattr(self._it, "close"):
            self._it.close()

    def close(self) -> None:
        self._close_inner()


def _read(ds, config: LoaderConfig):
    import grain

    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                prefetch_buffer_size=config.prefetch_buffer_size))


def _batched(rows, config: LoaderConfig, start: int = 0):
    """`ProcessRows` from local row `start` on -> the IterDataset of batches.

    Batched as a MapDataset, before the read threads and worker processes: grain's mp_prefetch
    gives worker w every n-th *element* of its input and interleaves the workers' outputs, so
    batches formed inside the workers would each hold one worker's rows (row order per worker, not
    the process' row order), and a position would not say which rows were consumed. Whole
    batches per worker keep the order of a single reader, with or without workers."""
    import grain

    ds = grain.MapDataset.source(rows)[start:].batch(config.batch_size, drop_remainder=config.drop_remainder)
    return _prefetched(_read(ds, config), config)


def make_dataset(datasets, config: LoaderConfig, encoder: TextEncoder, shard_index: int | None = None,
                 shard_count: int | None = None):
    """grain.IterDataset of this process' model batches (see module docstring).

    `datasets`: a DatasetSpec, a path, or a list of them (mixed by their weights).
    `encoder`: `tokenizer.TextEncoder` over the LLM's tokenizer.
    Unpacked: one global example order, this process' rows of each global batch (`ProcessRows`).
    Packed: this process' shard of the examples, packed in order (rows depend on the sequence).
    """
    specs = _as_specs(datasets)
    shard_index, shard_count = process_shard(shard_index, shard_count)
    if config.pack:
        return _packed(_mixture(specs, config, encoder, shard_index, shard_count), config, encoder)
    return _batched(_process_rows(specs, config, encoder, shard_index, shard_count), config)


def _process_rows(specs, config: LoaderConfig, encoder: TextEncoder, shard_index: int, shard_count: int):
    return ProcessRows(_mixture(specs, config, encoder, 0, 1), shard_index, shard_count, config.batch_size,
                       config.drop_remainder)


def _packed(ds, config: LoaderConfig, encoder: TextEncoder):
    from data_pipelines.packing import PackedBatchIterDataset

    it = PackedBatchIterDataset(_read(ds, config), config.batch_size, config.seq_len, config.media_slots,
                                encoder.pad_id, config.drop_remainder, groups=config.pack_groups)
    return _prefetched(it, config)


def _prefetched(it, config: LoaderConfig):
    import grain

    if config.worker_count > 0:
        _use_default_absl_flags()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size))
    return it


def _use_default_absl_flags() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` they are unparsed and
    reading one raises, so accept the defaults (a no-op when the program parsed them)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(datasets, config: LoaderConfig, encoder: TextEncoder, shard_index: int | None = None,
                shard_count: int | None = None):
    """An iterator of this process' batches with `get_state()` / `set_state(state)`: a
    `GlobalPositionLoader` (resumes on any process count), or for packed batches grain's iterator
    (its position is per process: resumes on the same process count only)."""
    if config.pack:
        return iter(make_dataset(datasets, config, encoder, shard_index, shard_count))
    shard_index, shard_count = process_shard(shard_index, shard_count)
    rows = _process_rows(_as_specs(datasets), config, encoder, shard_index, shard_count)
    return GlobalPositionLoader(rows, config, lambda start: iter(_batched(rows, config, start)))


def batch_spec(config: LoaderConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of one batch (for `jax.ShapeDtypeStruct`s before data exists)."""
    b, t, s, L = config.batch_size, config.num_frames, config.image_size, config.seq_len
    slots = (config.media_slots,) if config.pack else (b,)
    spec = {
        "frames": ((*slots, t, s, s, 3), np.float32), "frame_mask": ((*slots, t), np.bool_),
        "audio": ((*slots, config.num_audio_clips, 1, 128, 204), np.float32), "audio_mask": (slots, np.bool_),
        "input_ids": ((b, L), np.int32), "attention_mask": ((b, L), np.int32),
        "targets": ((b, L), np.int32), "media_mask": ((b, L), np.bool_),
    }
    if config.pack:
        spec.update(segment_ids=((b, L), np.int32), example_mask=(slots, np.bool_))
    return spec


# ---------------------------------------------------------------------------- trainer entry points

# Room for the stage-2 caption prompt ("###Human: <Image>..</Image> Describe ... ###Assistant: ")
# when seq_len is derived from max_txt_len.
PROMPT_ALLOWANCE = 48
# cc_sbu_align's reference dataset class returns the raw caption (no blip_caption processing).
_RAW_CAPTION_DATASETS = ("cc_sbu_align",)


def _caption_prompts(prompt_path: str) -> tuple[str, ...]:
    if not prompt_path:
        return ()
    if os.path.isfile(prompt_path):
        return prompts.load_prompt_file(prompt_path)
    if os.path.basename(prompt_path) == "alignment_image.txt":
        return prompts.ALIGNMENT_IMAGE_PROMPTS  # the reference's file, shipped as a constant
    raise LoaderError(f"prompt file {prompt_path!r} (config.paths.prompt_path) does not exist")


def _dataset_specs(data) -> list[DatasetSpec]:
    """DatasetSpecs from `config.data`: `dataset_shards` (name -> glob), or `shards` with an optional
    `{name}` field formatted per `datasets` entry; ratios -1 weigh a dataset by its size."""
    names = dict(data.get("datasets") or {})
    per_name = dict(data.get("dataset_shards") or {})
    shards = data.get("shards") or ""
    if not names:
        if not shards:
            raise LoaderError("config.data.shards is empty: name the ArrayRecord shards to train on")
        return [DatasetSpec(paths=(shards,), name="shards")]
    specs = []
    for name, ratio in names.items():
        pattern = per_name.get(name) or (shards.format(name=name) if "{name}" in shards else "")
        if not pattern:
            raise LoaderError(f"dataset {name!r}: no shards; set config.data.dataset_shards[{name!r}] or a "
                              f"config.data.shards glob containing '{{name}}'")
        weight = float(ratio) if ratio and ratio > 0 else float(len(ShardSource([pattern])))
        specs.append(DatasetSpec(paths=(pattern,), weight=weight, name=name,
                                 caption_processor="none" if name in _RAW_CAPTION_DATASETS else "blip"))
    return specs


def loader_config_from(config, train: bool = True) -> LoaderConfig:
    """LoaderConfig from the trainer's ml_collections config (`vllama_jax/train/config_lib.py`)."""
    import jax

    d, m, t = config.data, config.model, config.train
    caption_prompts = _caption_prompts(config.paths.get("prompt_path", ""))
    media = int(d.num_query_placeholders)
    seq_len = int(d.get("seq_len", 0)) or -(-(1 + media + int(m.max_txt_len) +
                                              (PROMPT_ALLOWANCE if caption_prompts else 0)) // 8) * 8
    global_batch = int(t.batch_size)
    if global_batch % jax.process_count():
        raise LoaderError(f"config.train.batch_size {global_batch} is not divisible by {jax.process_count()} processes")
    return LoaderConfig(
        batch_size=global_batch // jax.process_count(), seq_len=seq_len, num_frames=int(d.num_frames),
        image_size=int(d.image_size), num_media_tokens=media, num_audio_clips=int(d.num_audio_clips),
        conv_style=str(m.conv_style), max_txt_len=int(m.max_txt_len), caption_prompts=caption_prompts,
        caption_template=str(m.prompt_template), end_sym=str(m.end_sym), train=train,
        seed=int(t.seed) + (0 if train else 1), shuffle=train, num_epochs=None if train else 1,
        read_threads=int(d.get("read_threads", 2)), worker_count=int(d.get("worker_count", 0)),
        pack=bool(d.get("pack", False)), media_per_batch=_per_process(int(d.get("media_per_batch", 0)), "media_per_batch"),
        pack_groups=int(t.get("accum_steps", 1)) if d.get("pack", False) else 1,
        aligned_targets=bool(d.get("aligned_targets", False)))


def _per_process(global_count: int, name: str) -> int:
    import jax

    if global_count % jax.process_count():
        raise LoaderError(f"config.data.{name} {global_count} is not divisible by {jax.process_count()} processes")
    return global_count // jax.process_count()


def _encoder_from(config) -> TextEncoder:
    from data_pipelines.tokenizer import load_tokenizer

    path = config.paths.get("tokenizer", "") or config.paths.get("llama_model", "")
    if not path:
        raise LoaderError("config.paths.tokenizer (or paths.llama_model) must name a tokenizer directory; "
                          "tiny/demo runs can make one with data_pipelines.tokenizer.build_demo_tokenizer")
    return TextEncoder(load_tokenizer(path))


def build_train_iter(config):
    """`config.data.train_builder` entry point: this process' resumable iterator of train batches."""
    return make_loader(_dataset_specs(config.data), loader_config_from(config, train=True), _encoder_from(config))


def build_eval_iter(config):
    """`config.data.eval_builder` entry point: one pass over `config.data.eval_shards`, eval transforms."""
    shards = config.data.get("eval_shards", "")
    if not shards:
        raise LoaderError("config.data.eval_shards is empty: name the ArrayRecord shards to evaluate on")
    return make_loader(DatasetSpec(paths=(shards,), name="eval"), loader_config_from(config, train=False),
                       _encoder_from(config))
