"""TFDS builders (file_format='array_record') for every dataset, built on `shards.write_shards`.

TFDS's own generation path (`_generate_examples` -> SplitBuilder -> Writer) writes a whole
dataset into a fresh temporary directory, so an interrupted build restarts from zero, and it
decodes in one process. Our builders therefore override `_download_and_prepare`, the documented
hook of `tfds.core.DatasetBuilder`:
  1. the adapter lists items from the source files (`source_dir`, default: the manual dir);
  2. `write_shards` decodes them in a process pool into `<data_dir>/<name>/work-<version>/`,
     which survives interruptions (finished shards are reused, see shards.py);
  3. once every split is complete, the shard files are moved (renamed, not copied) into the
     directory TFDS is preparing, each split's JSON report next to them, and the split infos
     (shard lengths, bytes) are set; TFDS then writes dataset_info.json and renames the
     directory into place.
The result is a regular TFDS dataset: `tfds.data_source(name, data_dir=...)` /
`tfds.data_sources` return `{"record": bytes}` per example (`records.decode_example` turns
that into the example dict), and the files are plain ArrayRecord for grain. This needs no
TensorFlow: TFDS stores tf.train.Example protos through its own protobuf copies.

The command line is `vllama-prepare-data` (data_pipelines/cli.py). TFDS's own `tfds build`
entry point cannot start without TensorFlow in tfds 4.9.10 (its `convert_format` module uses
`tf.train` at import time), but its build command runs these builders fine when invoked directly:
  python -c "import simple_parsing; from tensorflow_datasets.scripts.cli import build;
             simple_parsing.parse(build.Args, args=['cc_sbu_align', '--imports',
             'data_pipelines.tfds_builders', '--manual_dir', SRC, '--data_dir', OUT]).execute()"
(`--max_examples_per_split` is honoured). Options with no TFDS flag (paths, workers, frames
kept) are constructor arguments.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import records, shards, synthetic
from data_pipelines.adapters import ADAPTERS, folder
from data_pipelines.adapters.common import MediaOptions, build_example

FEATURES = tfds.features.FeaturesDict({records.RECORD_FEATURE: tfds.features.Tensor(shape=(), dtype=np.object_)})


class ShardedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: subclasses set `name`, DESCRIPTION and `_split_items`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": f"Record format version {records.RECORD_VERSION} (data_pipelines/records.py)."}
    DESCRIPTION = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the dataset's published files as the manual dir (or source_dir=...)."
    DEFAULT_OPTIONS = MediaOptions()
    # Nothing is downloaded. TFDS would otherwise look for a checksums file next to the module,
    # through a code path that needs the `importlib_resources` backport (not a dependency here).
    url_infos = None

    def __init__(self, *, source_dir: Optional[str] = None, source_kwargs: Optional[Dict[str, Any]] = None,
                 options: Optional[MediaOptions] = None, examples_per_shard: Optional[int] = None,
                 num_workers: int = 0, progress: bool = True, keep_work_dir: bool = False,
                 beam_args: Optional[List[str]] = None, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._source_dir = source_dir
        self._source_kwargs = dict(source_kwargs or {})
        self._options = options or self.DEFAULT_OPTIONS
        self._examples_per_shard = examples_per_shard
        self._num_workers = num_workers
        self._progress = progress
        self._keep_work_dir = keep_work_dir
        # Not None: write through the Beam pipeline (data_pipelines/beam_shards.py) with these options.
        self._beam_args = beam_args
        # data_dir is swapped for a temporary one during preparation; the work dir must not move.
        self.work_dir = os.path.join(os.path.dirname(os.fspath(self.data_dir)), f"work-{self.version}")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(description=self.DESCRIPTION, features=FEATURES,
                                              disable_shuffling=True)

    def _split_items(self, source_dir: str) -> Dict[str, List[Dict[str, Any]]]:
        raise NotImplementedError(f"{type(self).__name__} must list its items")

    def _split_generators(self, dl_manager):
        raise NotImplementedError("this builder writes its shards itself; see _download_and_prepare")

    def _generate_examples(self, **kwargs):
        raise NotImplementedError("this builder writes its shards itself; see _download_and_prepare")

    def _source(self, dl_manager) -> str:
        source = self._source_dir or (dl_manager.manual_dir if dl_manager is not None else None)
        if not source or not os.path.isdir(os.fspath(source)):
            raise FileNotFoundError(f"{self.name}: source directory {source!r} does not exist. "
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return os.fspath(source)

    def _write_splits(self, source_dir: str, limit: Optional[int]) -> List[shards.SplitResult]:
        """Writes every split into the work dir (resumable); subclasses may write differently."""
        items = self._split_items(source_dir)
        decode_fn = functools.partial(build_example, options=self._options)
        if self._beam_args is not None:
            from data_pipelines import beam_shards

            return [beam_shards.write_shards(split_items[:limit], self.work_dir, decode_fn=decode_fn,
                                             dataset_name=self.name, split=split,
                                             examples_per_shard=self._examples_per_shard, beam_args=self._beam_args)
                    for split, split_items in items.items()]
        return [shards.write_shards(split_items[:limit], self.work_dir, decode_fn=decode_fn,
                                    dataset_name=self.name, split=split, **self._write_kwargs())
                for split, split_items in items.items()]

    def _write_kwargs(self) -> Dict[str, Any]:
        return dict(examples_per_shard=self._examples_per_shard, num_workers=self._num_workers,
                    progress=self._progress)

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        limit = getattr(download_config, "max_examples_per_split", None) or None
        results = self._write_splits(self._source(dl_manager), limit)
        self.info.set_splits(tfds.core.SplitDict([self._install(r) for r in results]))
        if not self._keep_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _install(self, result: shards.SplitResult) -> tfds.core.SplitInfo:
        out_dir = os.fspath(self.data_path)
        for path in result.shard_files:
            os.replace(path, os.path.join(out_dir, os.path.basename(path)))
        report = shards.report_filename(self.name, result.split)
        shutil.copyfile(os.path.join(self.work_dir, report), os.path.join(out_dir, report))
        return tfds.core.SplitInfo(name=result.split, shard_lengths=result.shard_lengths,
                                   num_bytes=result.num_bytes,
                                   filename_template=self._get_filename_template(result.split))


class _AdapterBuilder(ShardedBuilder, skip_registration=True):
    ADAPTER = ""

    def _split_items(self, source_dir):
        return ADAPTERS[self.ADAPTER].splits(source_dir, **self._source_kwargs)


class Webvid2m(_AdapterBuilder):
    name = "webvid2m"
    ADAPTER = "webvid2m"
    DESCRIPTION = "WebVid-2M video-caption pairs (Video-LLaMA stage 1)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Manual dir: results_2M_train.csv (and/or results_2M_val.csv) and "
                                    "videos/{page_dir}/{videoid}.mp4 (source_kwargs video_dir=... elsewhere).")


class Cc595k(_AdapterBuilder):
    name = "cc595k"
    ADAPTER = "cc595k"
    DESCRIPTION = "LLaVA CC3M-595K image-caption pairs (Video-LLaMA stage 1)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Manual dir: chat.json and images/ (source_kwargs image_dir=... elsewhere)."


class CcSbuAlign(_AdapterBuilder):
    name = "cc_sbu_align"
    ADAPTER = "cc_sbu_align"
    DESCRIPTION = "MiniGPT-4 cc_sbu_align image descriptions (Video-LLaMA stage 2)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Manual dir: the unpacked cc_sbu_align.zip (filter_cap.json, image/)."


class LlavaInstruct150k(_AdapterBuilder):
    name = "llava_instruct150k"
    ADAPTER = "llava_instruct150k"
    DESCRIPTION = "LLaVA-Instruct-150K image instructions (Video-LLaMA stage 2)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Manual dir: llava_instruct_150k.json and train2014/ COCO images "
                                    "(source_kwargs image_dir=... elsewhere).")


class VideochatInstruct11k(_AdapterBuilder):
    name = "videochat_instruct11k"
    ADAPTER = "videochat_instruct11k"
    DESCRIPTION = "VideoChat-Instruct-11K video instructions (Video-LLaMA stage 2)."
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Manual dir: videochat_instruct_11k.json and videos/ (WebVid files at "
                                    "the json's relative paths; source_kwargs video_dir=... elsewhere).")


class VllamaDemo(ShardedBuilder):
    """The synthetic audio-visual demo set (see synthetic.py); generates its media if needed."""

    name = "vllama_demo"
    DESCRIPTION = synthetic.__doc__
    DEFAULT_OPTIONS = synthetic.MEDIA_OPTIONS
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Media is generated into source_dir (default <data_dir>/vllama_demo/media)."

    def _source(self, dl_manager) -> str:
        return self._source_dir or os.path.join(os.path.dirname(self.work_dir), "media")

    def _write_splits(self, source_dir, limit):
        return synthetic.write_splits(source_dir, self.work_dir, limit=limit, options=self._options,
                                      **self._source_kwargs, **self._write_kwargs())


class Folder(ShardedBuilder, skip_registration=True):
    """Your own media folder + captions / instruction files (adapters/folder.py); `folder_builder`
    makes the class of a named dataset (the name is the directory and the shard files' prefix)."""

    DESCRIPTION = folder.__doc__
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Source dir: the media folder; source_kwargs captions=FILE (csv/jsonl) "
                                    "and/or instructions=[LLaVA / VideoChat json, ...].")

    def _split_items(self, source_dir):
        return folder.splits(source_dir, name=self.name, **self._source_kwargs)


def folder_builder(name: str = folder.DEFAULT_NAME) -> type:
    """The builder class of a folder dataset called `name` (not registered with TFDS)."""
    return type(f"Folder_{folder.check_name(name)}", (Folder,), {"name": name, "__module__": __name__},
                skip_registration=True)


BUILDERS = {b.name: b for b in (Webvid2m, Cc595k, CcSbuAlign, LlavaInstruct150k, VideochatInstruct11k, VllamaDemo)}


def build(name: str, data_dir: str, **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Prepares dataset `name` under data_dir (resuming an interrupted run) and returns its builder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    builder = BUILDERS[name](data_dir=data_dir, **builder_kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=builder_kwargs.get("source_dir")))
    return builder
