"""`shards.write_shards` as an Apache Beam pipeline: the same shard files, records and report.

  items of the shards not yet finished, written to `<out_dir>/<dataset>-<split>.items.jsonl`
  (read back by the workers: a job graph holding 2.5 M items would pass runners' size limits)
  -> (shard, position, item) -> Reshuffle -> decode + encode
  (shards._process, the single-process writer's worker function) -> GroupByKey(shard) -> one
  worker writes each shard (shards._ShardSink: temporary name, rename, sidecar) in input order.

Nothing differs from the single-process writer but who runs the work, so its records are
identical to `write_shards`'s for the same items, and so is the report (every skipped item with
its reason, counted by category). A shard whose file and matching sidecar exist is finished and
not planned again, so rerunning after a crash redoes only unfinished shards.

Runners are chosen by pipeline options (`beam_args`): DirectRunner with N worker processes on
one machine (`--direct_num_workers=N --direct_running_mode=multi_processing`), or
Dataflow / Flink / Spark (`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`).
Shard files are written with local file APIs (ArrayRecord), so on a cluster `out_dir` and the
media must be on a file system every worker mounts at the same path (NFS, a GCS / S3 FUSE
mount); the launcher reads the sidecars from there to write the report.

Install: `pip install -e ".[beam]"` (apache-beam is an optional dependency).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from data_pipelines import shards


def _write_work_list(plan: shards.ShardPlan, items: Sequence[Dict[str, Any]]) -> str:
    """The todo shards' items, one JSON line each: {"shard", "position", "item"}."""
    path = os.path.join(plan.out_dir, f"{plan.dataset_name}-{plan.split}.items.jsonl")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in plan.todo:
            for j in range(*plan.bounds[i]):
                f.write(json.dumps({"shard": i, "position": j, "item": items[j]}, ensure_ascii=True) + "\n")
    os.replace(tmp, path)
    return path


def _keyed(line: str) -> Tuple[int, Tuple[int, Dict]]:
    entry = json.loads(line)
    return entry["shard"], (entry["position"], entry["item"])


class _Decode:
    """(shard, (position, item)) -> (shard, (position, result)); picklable for any runner."""

    def __init__(self, decode_fn: Callable):
        self.decode_fn = decode_fn

    def __call__(self, element):
        shard, (position, item) = element
        return shard, (position, shards._process(self.decode_fn, item))


class _WriteShard:
    """(shard, [(position, result)]) -> (shard, sidecar info), the shard file written."""

    def __init__(self, paths: List[str], digests: List[str]):
        self.paths, self.digests = paths, digests

    def __call__(self, element):
        shard, results = element
        sink = shards._ShardSink(self.paths[shard], self.digests[shard])
        for _, result in sorted(results, key=lambda pr: pr[0]):
            sink.add(result)
        return shard, sink.close()


def write_shards(items: Sequence[Dict[str, Any]], out_dir: str, *, decode_fn: Callable[[Dict], Dict],
                 dataset_name: str, split: str, examples_per_shard: Optional[int] = None,
                 num_shards: Optional[int] = None, beam_args: Iterable[str] = ()) -> shards.SplitResult:
    """As `shards.write_shards`, run as a Beam pipeline with the pipeline options in `beam_args`
    (default: DirectRunner in this process). Returns the SplitResult, also saved as the report."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    plan = shards.plan_shards(items, out_dir, dataset_name, split, examples_per_shard, num_shards)
    if plan.todo:
        work_list = _write_work_list(plan, items)
        with beam.Pipeline(options=PipelineOptions(list(beam_args))) as p:
            _ = (p
                 | "items" >> beam.io.ReadFromText(work_list)
                 | "key" >> beam.Map(_keyed)
                 | "spread" >> beam.Reshuffle()
                 | "decode" >> beam.Map(_Decode(decode_fn))
                 | "by shard" >> beam.GroupByKey()
                 | "write" >> beam.Map(_WriteShard(plan.paths, plan.digests)))
        # The sidecars are the workers' results; reading them back works for every runner.
        for i in plan.todo:
            plan.infos[i] = shards._load_sidecar(plan.paths[i], plan.digests[i])
        os.remove(work_list)
    return shards.finish_split(plan)
