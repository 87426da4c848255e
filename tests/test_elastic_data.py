"""The ArrayRecord loader's global example order (issue 23): every process takes its own rows of
each global batch of one global order, so N processes' batches are disjoint and together are the
one-process run's, and a position saved on N processes resumes on N' with no example repeated
or skipped. Processes are simulated with `shard_index` / `shard_count` (the real multi-process
run of the same mechanism: tests/test_elastic.py)."""
import dataclasses
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipelines import loader, prompts
from data_pipelines.tokenizer import TextEncoder, build_demo_tokenizer, load_tokenizer
from test_loader import CFG, caption_example, conv_example, write_shards
from train_utils import CountingIterator, setup_state, toy_task
from vllama_jax import sharding
from vllama_jax.checkpoint import Checkpointer
from vllama_jax.train import feature_cache
from vllama_jax.train import partition
from vllama_jax.train import step as train_step

B = 2   # rows per process
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    texts = [f"clip number {i} what is {i} it is {i}" for i in range(50)]
    texts += [prompts.VICUNA_CAPTION_TEMPLATE, "The video contains frames sampled at seconds."]
    return TextEncoder(load_tokenizer(build_demo_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=500)))


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("shards")
    caps = [caption_example(i, rng, media="video" if i % 3 else "image", audio=i % 4 == 0) for i in range(21)]
    convs = [conv_example(i, rng, media="image" if i % 2 else "video") for i in range(7)]
    return [loader.DatasetSpec(write_shards(str(d / "cap"), caps), weight=3.0),
            loader.DatasetSpec(write_shards(str(d / "conv"), convs), weight=1.0)]


def _cfg(batch_size, **kw):
    return dataclasses.replace(CFG, batch_size=batch_size, keep_ids=True, seq_len=160, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _global(batches_per_process):
    """Per-step concatenation of the processes' batches (process order = row order)."""
    return [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in zip(*batches_per_process)]


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"batch {i} {k}")


def test_process_rows_map_local_rows_into_global_batches():
    rows = loader.ProcessRows(list(range(23)), index=1, count=3, batch_size=2)
    assert [rows.global_index(j) for j in range(6)] == [2, 3, 8, 9, 14, 15]
    assert len(rows) == 6   # 23 examples: 3 whole global batches of 6, the 5 left dropped
    assert [rows[j] for j in range(len(rows))] == [2, 3, 8, 9, 14, 15]
    with pytest.raises(IndexError):
        rows[6]
    # Without drop_remainder the last global batch's 5 examples go to rows in process order.
    tails = [len(loader.ProcessRows(list(range(23)), p, 3, 2, drop_remainder=False)) - 6 for p in range(3)]
    assert tails == [2, 2, 1]
    one = loader.ProcessRows(list(range(7)), 0, 1, 3, drop_remainder=False)
    assert [one[j] for j in range(len(one))] == list(range(7))   # one process: the identity


def test_processes_split_the_one_process_global_batches(specs, encoder):
    """2 and 4 processes: disjoint rows whose union per step is the one-process batch, to the pixel
    (crops and prompts are drawn per global example, not per process)."""
    one = _take(loader.make_loader(specs, _cfg(4 * B), encoder, 0, 1), 6)
    for count in (2, 4):
        per = [_take(loader.make_loader(specs, _cfg(4 * B // count), encoder, p, count), 6) for p in range(count)]
        _assert_batches_equal(_global(per), one)


def test_one_epoch_over_processes_is_disjoint_and_complete(specs, encoder):
    cfg = _cfg(B, num_epochs=1)
    seen = [[str(x) for b in loader.make_loader(specs[0], cfg, encoder, p, 2) for x in b["example_id"]]
            for p in range(2)]
    assert len(seen[0]) == len(seen[1]) == 10   # 21 records: 5 global batches of 4, one left over
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 20


def test_one_process_order_is_the_global_order(specs, encoder):
    """One process reads the global order itself (the order the loader had before it was global:
    the same batches bit for bit, checked against that version when this was written)."""
    cfg = _cfg(3)
    examples = loader._mixture(specs, cfg, encoder, 0, 1)
    got = _take(loader.make_loader(specs, cfg, encoder, 0, 1), 5)
    ids = [str(x) for b in got for x in b["example_id"]]
    assert ids == [str(examples[i]["example_id"]) for i in range(15)]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_a_position_saved_on_n_processes_resumes_on_another_count(specs, encoder, before, after):
    g = 4 * B
    whole = _take(loader.make_loader(specs, _cfg(g), encoder, 0, 1), 7)
    first = [loader.make_loader(specs, _cfg(g // before), encoder, p, before) for p in range(before)]
    done = _global([_take(it, 3) for it in first])
    states = [it.get_state() for it in first]
    assert all(s == states[0] for s in states) and states[0] == {"global_examples": 3 * g, "global_batch_size": g}
    resumed = [loader.make_loader(specs, _cfg(g // after), encoder, p, after) for p in range(after)]
    for it in resumed:
        assert it.state_is_global
        it.set_state(states[0])
    rest = _global([_take(it, 4) for it in resumed])
    _assert_batches_equal(done + rest, whole)   # nothing repeated, nothing skipped, same pixels


def test_finite_epoch_resume_covers_every_example_once(specs, encoder):
    cfg = _cfg(B, num_epochs=1, drop_remainder=True)
    first = [loader.make_loader(specs, cfg, encoder, p, 2) for p in range(2)]
    seen = [x for it in first for b in _take(it, 2) for x in b["example_id"]]
    state = first[0].get_state()
    resumed = loader.make_loader(specs, dataclasses.replace(cfg, batch_size=2 * B), encoder, 0, 1)
    resumed.set_state(state)
    seen += [x for b in resumed for x in b["example_id"]]
    whole = [x for b in loader.make_loader(specs, dataclasses.replace(cfg, batch_size=2 * B), encoder, 0, 1)
             for x in b["example_id"]]
    assert sorted(map(str, seen)) == sorted(map(str, whole)) and len(whole) == 28


def test_worker_processes_feed_the_same_batches_and_resume_at_the_global_position(specs, encoder):
    """mp_prefetch worker processes: the same batches as a single reader (grain hands each worker
    whole batches), and their position resumes elsewhere."""
    one = [loader.make_loader(specs, _cfg(B), encoder, p, 2) for p in range(2)]
    whole = _global([_take(it, 4) for it in one])
    it = loader.make_loader(specs, _cfg(B, worker_count=2), encoder, 1, 2)
    _assert_batches_equal(_take(it, 2), [{k: v[B:] for k, v in b.items()} for b in whole[:2]])
    state = it.get_state()
    it.close()
    resumed = loader.make_loader(specs, _cfg(2 * B), encoder, 0, 1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), whole[2:])


def test_states_it_cannot_resume_are_user_errors(specs, encoder):
    it = loader.make_loader(specs, _cfg(B), encoder, 0, 2)
    with pytest.raises(loader.LoaderStateError, match="older vllama_jax"):
        it.set_state({"next_index": 8})   # grain's per-process state, as this loader wrote before
    with pytest.raises(loader.LoaderStateError, match="global batch of 6.*this run's is 4"):
        it.set_state({"global_examples": 12, "global_batch_size": 6})
    with pytest.raises(loader.LoaderStateError, match="not a whole number"):
        it.set_state({"global_examples": 6, "global_batch_size": 4})


def test_a_state_the_loader_refuses_is_not_set_aside_as_damage(tmp_path, specs, encoder):
    """restore_newest passes the loader's LoaderStateError through (a user decision), and leaves
    the checkpoint where it is."""
    task = toy_task()
    mesh = sharding.make_mesh((2, 2, 2))
    state, _, tx, _, paths = setup_state(task, mesh=mesh)
    b_train, _ = partition.split(task.abstract_params(), paths)
    abstract = train_step.abstract_state(b_train, tx, train_step.state_shardings(b_train, tx, mesh))
    old = CountingIterator(lambda i: i)   # its state {"i": ...} is no position of this loader
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(state, old, trainable_paths=paths, wait=True)
        with pytest.raises(loader.LoaderStateError, match="not this loader's"):
            ck.restore_newest(abstract, loader.make_loader(specs, _cfg(B), encoder, 0, 1), trainable_paths=paths)
        assert ck.all_steps() == [state.step]


def test_packed_batches_stay_per_process(specs, encoder):
    """Packed rows depend on the examples read before them: their loader keeps grain's per-process
    state and does not claim to resume on another count (the checkpointer refuses such a resume)."""
    it = loader.make_loader(specs, _cfg(B, pack=True), encoder, 0, 2)
    assert not getattr(it, "state_is_global", False)


# ---------------------------------------------------------------------------- the feature cache

def _parts(n_examples, count, b, tmp_path=None):
    """A cache of `n_examples` as `count` processes build it: part p holds its ProcessRows rows
    (no remainder dropped), each row's features a function of its global index."""
    parts = []
    for p in range(count):
        rows = loader.ProcessRows(list(range(n_examples)), p, count, b, drop_remainder=False)
        gi = np.array([rows.global_index(j) for j in range(len(rows))], np.int64)
        part = feature_cache.FeatureDataset({"image_features": np.stack([np.full((2, 3), g, np.float32) for g in gi]),
                                             "input_ids": gi[:, None].astype(np.int32).repeat(4, 1),
                                             feature_cache.GLOBAL_INDEX: gi})
        if tmp_path is not None:
            part.save(str(tmp_path / f"process_{p:03d}-of-{count:03d}"))
        parts.append(part)
    return parts


def test_feature_cache_parts_read_as_one_global_order():
    data = feature_cache.GlobalFeatures(_parts(23, 3, 2))
    assert len(data) == 23
    got = data.take(np.array([22, 0, 7, 8]))
    np.testing.assert_array_equal(got["input_ids"][:, 0], [22, 0, 7, 8])
    np.testing.assert_array_equal(got["image_features"][:, 0, 0], [22, 0, 7, 8])
    assert feature_cache.GLOBAL_INDEX not in data.arrays
    with pytest.raises(ValueError, match="not global examples"):
        feature_cache.GlobalFeatures(_parts(23, 3, 2)[:2])


@pytest.mark.parametrize("before,after", [(2, 1), (1, 4), (4, 2)])
def test_feature_cache_position_resumes_on_another_process_count(before, after):
    """Built by 3 processes; trained on `before`, resumed on `after`: the concatenated batches are
    the one-process stream's, across an epoch boundary."""
    data = feature_cache.GlobalFeatures(_parts(23, 3, 2))
    g = 4
    one = data.iterator(g, seed=5)
    whole = [next(one) for _ in range(9)]   # 5 global batches per epoch: crosses into epoch 2
    first = [data.iterator(g // before, seed=5, process_index=p, process_count=before) for p in range(before)]
    done = _global([_take(it, 4) for it in first])
    state = first[0].get_state()
    assert state == {"step": 4, "global_batch_size": g} and first[0].state_is_global
    resumed = [data.iterator(g // after, seed=5, process_index=p, process_count=after) for p in range(after)]
    for it in resumed:
        it.set_state(state)
    _assert_batches_equal(done + _global([_take(it, 5) for it in resumed]), whole)
    with pytest.raises(feature_cache.CacheStateError, match="global batch of 4"):
        data.iterator(3, seed=5).set_state(state)


def test_feature_cache_directory_layouts(tmp_path):
    _parts(11, 2, 2, tmp_path / "new")
    count, paths = feature_cache.cache_parts(str(tmp_path / "new"))
    assert count == 2 and len(paths) == 2
    data = feature_cache._open_cache(str(tmp_path / "new"), count, paths)   # this test runs 1 process
    assert isinstance(data, feature_cache.GlobalFeatures) and len(data) == 11
    with pytest.raises(ValueError, match="1 of the 2 parts"):
        feature_cache._open_cache(str(tmp_path / "new"), count, paths[:1])
    # A cache from before global indices: per process, only on the count that built it.
    for p in range(2):
        feature_cache.FeatureDataset({"input_ids": np.zeros((5, 4), np.int32)}).save(
            str(tmp_path / "old" / f"process_{p:03d}-of-002"))
    count, paths = feature_cache.cache_parts(str(tmp_path / "old"))
    with pytest.raises(ValueError, match="built per process by 2 process.*this run has 1"):
        feature_cache._open_cache(str(tmp_path / "old"), count, paths)


# ---------------------------------------------------------------------------- real processes

def _phase(tmp_path, name, count, batches, shards, tokenizer):
    """`count` processes (jax.distributed when > 1) continue the checkpoint in tmp_path/workdir."""
    from test_multiprocess import _free_port, _stop

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs, logs = [], []
    try:
        for i in range(count):
            logs.append(open(tmp_path / f"{name}_{i}.log", "w+"))
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "elastic_data_worker.py"), "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", str(count), "--process-id", str(i), "--shards", shards, "--tokenizer", tokenizer,
                 "--global-batch", "4", "--batches", str(batches), "--workdir", str(tmp_path / "workdir"),
                 "--out", str(tmp_path / f"{name}_{i}.npz")], stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        _stop(procs)
    for i, log in enumerate(logs):
        log.seek(0)
        assert procs[i].returncode == 0, f"{name} worker {i} failed:\n{log.read()[-4000:]}"
        log.close()
    runs = [np.load(tmp_path / f"{name}_{i}.npz") for i in range(count)]
    return (np.concatenate([r["ids"] for r in runs], axis=1), np.concatenate([r["pixels"] for r in runs], axis=1),
            int(runs[0]["start"]))


@pytest.mark.slow
@pytest.mark.ci
def test_two_processes_to_one_to_two_keep_the_data_position(tmp_path, encoder):
    """2 `jax.distributed` processes take 3 global batches and checkpoint; 1 process resumes for 3;
    2 processes resume for 2: the 8 global batches, ids and pixels, are one uninterrupted
    process' 8, and the checkpoints hold 2, 1 and 2 data-state files."""
    rng = np.random.default_rng(0)
    paths = write_shards(str(tmp_path / "cap"), [caption_example(i, rng) for i in range(13)], num_shards=2)
    shards = str(tmp_path / "cap-*.array_record")
    tokenizer = str(tmp_path / "tok")
    encoder.tokenizer.save_pretrained(tokenizer)
    t0 = time.monotonic()
    got = [_phase(tmp_path, "a", 2, 3, shards, tokenizer), _phase(tmp_path, "b", 1, 3, shards, tokenizer),
           _phase(tmp_path, "c", 2, 2, shards, tokenizer)]
    assert [g[2] for g in got] == [0, 3, 6]
    cfg = dataclasses.replace(CFG, keep_ids=True, seq_len=160, batch_size=4)
    whole = _take(loader.make_loader(loader.DatasetSpec(tuple(paths)), cfg, encoder, 0, 1), 8)
    ids = np.concatenate([g[0] for g in got])
    assert ids.tolist() == [[str(x) for x in b["example_id"]] for b in whole]
    np.testing.assert_allclose(np.concatenate([g[1] for g in got]),
                               [b["frames"].reshape(4, -1).sum(1) for b in whole], rtol=1e-6)
    data = sorted(p.name for p in (tmp_path / "workdir" / "checkpoints" / "8" / "data").glob("process_*"))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"], data
    print(f"2 -> 1 -> 2 processes: {time.monotonic() - t0:.1f} s")
