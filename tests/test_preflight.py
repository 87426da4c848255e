"""Preflight: mismatched run inputs are one line naming both sides, before the first step; the tiny
configs train on what `vllama-prepare-data` writes (demo shards + its `tokenizer` subcommand)."""
import glob
import os

import numpy as np
import pytest

from train_utils import REPO
from data_pipelines import cli as prep
from data_pipelines import loader
from data_pipelines.loader import ShardSource
from vllama_jax import config_loader
from vllama_jax.train import cli as train_cli
from vllama_jax.train import preflight
from vllama_jax.train.video_llama_task import build_task

TINY1 = os.path.join(REPO, "configs", "tiny_stage1.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4+4 demo clips stored with 2 audio clips and 4 frames, and a tokenizer from their text."""
    root = tmp_path_factory.mktemp("data")
    assert prep.main(["demo", "--data-dir", str(root), "--num-train", "4", "--num-test", "4", "--workers", "0",
                      "--no-progress", "--audio-clips", "2", "--frames", "4"]) == 0
    shards = str(root / "vllama_demo" / "1.0.0" / "vllama_demo-caption_train.array_record*")
    assert prep.main(["tokenizer", "--shards", shards.replace("caption", "instruct"),
                      "--out", str(root / "tok")]) == 0
    return shards, str(root / "tok")


def _config(data, **data_fields):
    c = config_loader.load_file(TINY1)
    c.data.shards, c.paths.tokenizer = data
    for k, v in data_fields.items():
        c.data[k] = v
    return c


def test_prepare_data_stores_the_asked_geometry(data):
    example = ShardSource([data[0]])[0]
    assert np.shape(example["fbank"]) == (2, 1, 128, 204) and len(example["frames"]) == 4


def test_tiny_config_passes_preflight_and_loads_a_batch(data):
    config = _config(data, num_audio_clips=2)
    task = build_task(config)
    preflight.check_config(config, task)
    assert preflight.text_vocab_size(data[1]) <= task.config.llama.vocab_size
    batch = next(loader.build_train_iter(config))
    preflight.check_batch(batch, task, config)


def test_vocab_mismatch_names_both_sizes(data):
    config = _config(data, num_audio_clips=2)
    config.model.vocab_size = 256
    n = preflight.text_vocab_size(data[1])
    with pytest.raises(preflight.PreflightError, match=rf"tokenizer .* has {n} tokens but the model's LLaMA "
                                                       rf"vocabulary .* has 256.*--config.model.vocab_size={n}"):
        preflight.check_config(config, build_task(config))


def test_token_id_past_vocab_in_a_batch(data):
    config = _config(data, num_audio_clips=2)
    task = build_task(config)
    batch = dict(next(loader.build_train_iter(config)))
    batch["input_ids"] = batch["input_ids"].copy()
    batch["input_ids"][0, -1] = task.config.llama.vocab_size + 5
    with pytest.raises(preflight.PreflightError, match=r"input_ids holds token id 1029 but the model's vocabulary "
                                                       r"has 1024"):
        preflight.check_batch(batch, task, config)
    batch = dict(next(loader.build_train_iter(config)))
    batch["frames"] = batch["frames"][:, :1]
    with pytest.raises(preflight.PreflightError, match=r"frames per example \(1, 28, 28, 3\) but the config expects "
                                                       r"\(2, 28, 28, 3\)"):
        preflight.check_batch(batch, task, config)


def test_audio_clip_mismatch_is_found_on_the_first_record(data):
    config = _config(data)   # tiny_stage1 expects 8 clips (vllama-prepare-data's default)
    with pytest.raises(loader.LoaderError, match=r"shards store 2 audio clips .* config.data.num_audio_clips = 8: set "
                       r"--config.data.num_audio_clips=2 .* --audio-clips 8"):
        loader.build_train_iter(config)


def test_placeholders_vs_query_tokens(data):
    config = _config(data, num_audio_clips=2, num_query_placeholders=3)
    with pytest.raises(preflight.PreflightError, match=r"num_query_placeholders = 3 .* the model puts 4 query "
                                                       r"tokens .*--config.data.num_query_placeholders=4"):
        preflight.check_config(config, build_task(config))


@pytest.mark.parametrize("override, message", [
    ("--config.paths.tokenizer=/no/such/tok", "config.paths.tokenizer = '/no/such/tok' does not exist"),
    ("--config.data.shards=/no/such/shards*", "shard pattern '/no/such/shards*' matches no file"),
    ("--config.paths.ckpt=/no/such/run", "config.paths.ckpt = '/no/such/run' does not exist"),
    ("--config.data.num_audio_clips=8", "shards store 2 audio clips"),
])
def test_train_cli_mismatch_is_one_line_before_anything_is_written(tmp_path, capsys, data, override, message):
    argv = ["vllama-train", "--config", TINY1, "--workdir", str(tmp_path / "w"), f"--config.data.shards={data[0]}",
            f"--config.paths.tokenizer={data[1]}", "--config.data.num_audio_clips=2", override]
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "w").exists()
    assert glob.glob(data[0])   # the shards are untouched


@pytest.mark.slow
@pytest.mark.ci
def test_tiny_stage1_trains_on_prepared_data_from_a_relative_workdir(tmp_path, monkeypatch, data, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["vllama-train", "--config", TINY1, "--workdir", "run", f"--config.data.shards={data[0]}",
            f"--config.paths.tokenizer={data[1]}", "--config.data.num_audio_clips=2",
            "--config.train.total_steps=2", "--config.train.progress=False", "--config.train.tensorboard=False"]
    assert train_cli.main(argv) == 0
    assert "finished at step 2" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
