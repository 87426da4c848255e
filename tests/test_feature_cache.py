"""Frozen-feature cache: the cached loss and trainable gradients equal the uncached ones, and the
trainer's config path builds, reloads and replays the cache."""
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close

from vllama_jax.models.video_llama import BRANCHES, VideoLlama, VideoLlamaConfig, dummy_batch
from vllama_jax.train import config_lib
from vllama_jax.train import feature_cache
from vllama_jax.train import partition
from vllama_jax.train.task import build_task
from vllama_jax.train.video_llama_task import VideoLlamaTask

MEDIA = ("audio", "video")
TRAINABLE = BRANCHES["vision"].trainable_patterns() + BRANCHES["audio"].trainable_patterns()


def _random_rows(config: VideoLlamaConfig, batch_size, num_frames, media, seed, num_clips=1):
    rng = np.random.default_rng(seed)
    batch = {k: np.array(v) for k, v in dummy_batch(config, batch_size, num_frames, num_clips, media).items()}
    batch["frames"] = rng.normal(size=batch["frames"].shape).astype(np.float32)
    if "audio" in batch:
        batch["audio"] = rng.normal(size=batch["audio"].shape).astype(np.float32)
    batch["frame_mask"][0, 1:] = False  # an image padded to T frames
    batch["input_ids"] = rng.integers(3, config.llama.vocab_size, batch["input_ids"].shape).astype(np.int32)
    batch["targets"] = np.where(batch["media_mask"], -100, batch["input_ids"]).astype(np.int32)
    return batch


@pytest.fixture(scope="module")
def setup():
    # Without ImageBind's vision tower (audio_from_frames), which the media here do not use.
    config = VideoLlamaConfig.preset("tiny").replace(imagebind_vision=None)
    task = VideoLlamaTask(config, MEDIA)
    params = jax.jit(task.init_params)(jax.random.key(0))
    return task, params, _random_rows(config, 3, 2, MEDIA, seed=0, num_clips=3)


def _loss_and_grads(task, params, batch, patterns, deterministic=True):
    trainable, frozen = partition.split(params, partition.trainable_paths(params, patterns))

    def f(t, frozen, batch):
        return task.loss_fn(partition.merge(t, frozen), batch, jax.random.key(1), deterministic)[0]

    # Frozen params and batch are arguments, not closed-over constants XLA would try to fold.
    return jax.jit(jax.value_and_grad(f))(trainable, frozen, batch)


def _cached_batch(task, params, batch):
    data = feature_cache.build_feature_dataset(
        task.model, {"params": params}, [batch], feature_cache.outputs_for_media(MEDIA),
        method=VideoLlama.encode_media, method_args=(MEDIA,), keep=None, drop=feature_cache.RAW_MEDIA_KEYS)
    return data.arrays


@pytest.mark.slow  # the audio + video tiny model compiles for minutes on a loaded 2-core CI
@pytest.mark.ci
def test_cached_loss_and_grads_equal_uncached(setup):
    task, params, batch = setup
    deterministic = False  # dropout in the trainable Q-Formers draws the same masks either way
    cached = _cached_batch(task, params, batch)
    assert cached["image_features"].shape == (3, 2, 8, 32)    # [B, T, Q_img, D_img]
    assert cached["audio_features"].shape == (3, 3, 24)       # [B, M, E]
    assert "frames" not in cached and "audio" not in cached
    cached_task = feature_cache.CachedFeatureTask(task, feature_cache.outputs_for_media(MEDIA))
    # The cached towers' params are not needed (nor kept) by the cached task.
    slim = cached_task._drop(params)
    assert "image_encoder" not in slim and "audio_encoder" not in slim and "llama" in slim
    loss, grads = _loss_and_grads(task, params, batch, TRAINABLE, deterministic)
    c_loss, c_grads = _loss_and_grads(cached_task, slim, cached, TRAINABLE, deterministic)
    assert float(loss) > 1.0
    err = assert_close(c_loss, loss, atol=1e-5, what="cached loss")
    print(f"cached vs uncached loss: {err:.2e}")
    assert jax.tree.structure(c_grads) == jax.tree.structure(grads)
    for path, g in partition.flatten(grads).items():
        assert_close(partition.flatten(c_grads)[path], g, atol=1e-5, what=path)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow  # the audio + video tiny model compiles for minutes on a loaded 2-core CI
@pytest.mark.ci
def test_short_last_batch_is_padded_and_trimmed(setup):
    task, params, batch = setup
    last = {k: v[1:2] for k, v in batch.items()}
    data = feature_cache.build_feature_dataset(task.model, {"params": params}, [batch, last],
                                               feature_cache.VIDEO_LLAMA_OUTPUTS[:2], method=VideoLlama.encode_media,
                                               method_args=(MEDIA,), keep=("input_ids",))
    whole = _cached_batch(task, params, batch)
    assert len(data) == 4 and np.array_equal(data["input_ids"][3], batch["input_ids"][1])
    for key in ("image_features", "audio_features"):
        assert_close(data[key][:3], whole[key], atol=1e-6, what=key)
        assert_close(data[key][3], whole[key][1], atol=1e-6, what=key + " of the padded batch")


@pytest.mark.slow  # the audio + video tiny model compiles for minutes on a loaded 2-core CI
@pytest.mark.ci
def test_missing_cached_key_is_named(setup):
    task, params, batch = setup
    cached = _cached_batch(task, params, batch)
    del cached["audio_features"]
    stub = dict(cached, audio=np.zeros((3, 3, 1, 1, 1), np.float32))
    with pytest.raises(KeyError, match="audio_features"):
        feature_cache.CachedFeatureTask(
            task, stub=lambda b: feature_cache.stub_video_llama_media(b) | {"audio": stub["audio"]}).loss_fn(
            params, cached, jax.random.key(0), True)


@pytest.mark.slow  # the audio + video tiny model compiles for minutes on a loaded 2-core CI
@pytest.mark.ci
def test_capture_names_a_submodule_that_was_not_called(setup):
    task, params, batch = setup
    outputs = feature_cache.VIDEO_LLAMA_OUTPUTS[:1] + (feature_cache.CachedOutput("audio_qformer/layer_9", "x"),)
    with pytest.raises(KeyError, match="audio_qformer/layer_9"):
        jax.eval_shape(lambda p, b: feature_cache.capture(task.model, {"params": p}, outputs, 3, b, MEDIA,
                                                          method=VideoLlama.encode_media), params, batch)
    with pytest.raises(ValueError, match="unknown media"):
        feature_cache.outputs_for_media(("smell",))


def test_dataset_directory_round_trip_and_resumable_iterator(tmp_path):
    bf16 = np.arange(20, dtype=np.float32).reshape(10, 2).astype(ml_dtypes.bfloat16)
    data = feature_cache.FeatureDataset({"x": np.arange(10), "y": np.arange(10) * 2, "f": bf16})
    path = data.save(str(tmp_path / "cache"))
    data = feature_cache.FeatureDataset.load(path)
    assert data["f"].dtype == ml_dtypes.bfloat16 and isinstance(data["x"], np.memmap)
    it = data.iterator(4, seed=3)
    batches = [next(it) for _ in range(6)]
    assert all(np.array_equal(b["y"], 2 * b["x"]) for b in batches)
    assert all(np.array_equal(b["f"][:, 0].astype(np.float32), 2 * b["x"]) for b in batches)
    # 2 batches per epoch (the remainder is dropped); each epoch's 8 examples are distinct.
    for e in range(3):
        xs = np.concatenate([b["x"] for b in batches[2 * e:2 * e + 2]])
        assert len(set(xs.tolist())) == 8
    assert not np.array_equal(batches[0]["x"], batches[2]["x"])
    again = data.iterator(4, seed=3)
    again.set_state({"step": 4})
    assert np.array_equal(next(again)["x"], batches[4]["x"])
    with pytest.raises(ValueError, match="leading"):
        feature_cache.FeatureDataset({"x": np.zeros(3), "y": np.zeros(4)})
    with pytest.raises(ValueError, match="batch_size"):
        data.iterator(11)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        feature_cache.FeatureDataset.load(str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------- the trainer's config path

def source_batches(config):
    """`feature_cache.source_builder` for the tests: 5 random rows of the tiny stage-1 shapes."""
    task = build_task(config)
    full = _random_rows(task.config, 5, int(config.data.num_frames), task.media, seed=7)
    return [{k: v[:3] for k, v in full.items()}, {k: v[3:] for k, v in full.items()}]


def failing_source(config):
    raise AssertionError("the cache should have been loaded, not rebuilt")


def _stage1_config(path, source="test_feature_cache:source_batches"):
    config = config_lib.tiny(config_lib.video_llama("vision", 1, "vicuna7b"))
    config.train.batch_size = 2
    config.feature_cache.enabled = True
    config.feature_cache.path = str(path)
    config.feature_cache.source_builder = source
    return config


def test_from_config_builds_reloads_and_replays_the_trainers_params(tmp_path):
    config = _stage1_config(tmp_path / "cache")
    task = build_task(config)
    cached_task, it = feature_cache.from_config(config, task)
    assert os.path.isfile(os.path.join(feature_cache.cache_dir(str(tmp_path / "cache")), "meta.json"))
    batch = next(it)
    assert set(batch) == {"image_features", "frame_mask", "input_ids", "attention_mask", "targets", "media_mask"}
    assert batch["image_features"].shape[:2] == (2, int(config.data.num_frames))
    assert it.get_state() == {"step": 1, "global_batch_size": 2}

    # Rebuilt from the files, not from the source; same rows in the same order.
    config_again = _stage1_config(tmp_path / "cache", source="test_feature_cache:failing_source")
    _, it_again = feature_cache.from_config(config_again, build_task(config_again))
    again = next(it_again)
    assert all(np.array_equal(again[k], v) for k, v in batch.items())

    # The cache replays what the trainer's own initial params compute from the raw rows.
    raw = {k: np.concatenate([b[k] for b in source_batches(config)]) for k in source_batches(config)[0]}
    data = feature_cache.FeatureDataset.load(feature_cache.cache_dir(str(tmp_path / "cache")))
    params = jax.jit(task.init_params)(jax.random.split(jax.random.PRNGKey(int(config.train.seed)))[0])
    rows = {k: data[k][:] for k in data.arrays}
    # Forward losses only (the slow tests above compare gradients too).
    loss = jax.jit(lambda p, b: task.loss_fn(p, b, jax.random.key(1), True)[0])(params, raw)
    c_loss = jax.jit(lambda p, b: cached_task.loss_fn(p, b, jax.random.key(1), True)[0])(
        cached_task._drop(params), rows)
    assert float(loss) > 1.0
    assert_close(c_loss, loss, atol=1e-5, what="cached loss from the config path")


def test_from_config_refuses_a_trainable_tower(tmp_path):
    config = _stage1_config(tmp_path / "cache")
    config.freeze.patterns = ("image_encoder/qformer/.*",)
    with pytest.raises(ValueError, match="must be frozen"):
        feature_cache.from_config(config, build_task(config))
    config.feature_cache.path = ""
    with pytest.raises(ValueError, match="feature_cache.path"):
        feature_cache.from_config(config, build_task(config))
