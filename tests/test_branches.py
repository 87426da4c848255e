"""The branch declaration (`models.video_llama.BRANCHES`) and everything derived from it agree:
for every preset config, the trainer's partition, the `.pth` converter's key map and the
optimizer state cover the same leaves."""
import glob
import os

import jax
import pytest

from train_utils import REPO
from vllama_jax import sharding
from vllama_jax.convert import video_llama as convert
from vllama_jax.models import video_llama
from vllama_jax.train import cli, config_lib, feature_cache, loop, partition
from vllama_jax.train.task import trainable_patterns
from vllama_jax.train.video_llama_task import build_task


def _preset_configs():
    """(name, arg) of every configs/*.py whose task is Video-LLaMA's (audio_branch: both stages)."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        source = open(path).read()
        if "config_lib.video_llama(" in source:
            out += [(name, "1"), (name, "2")] if "def get_config(arg" in source else [(name, "")]
    return out


PRESETS = _preset_configs()


def test_every_video_llama_preset_is_covered():
    names = {n for n, _ in PRESETS}
    assert {"stage1_vicuna7b", "stage2_llama2_13b", "audio_branch", "tiny_stage1", "tiny_stage2"} <= names


@pytest.mark.parametrize("name,arg", PRESETS)
def test_trained_leaves_equal_exported_keys_equal_optimizer_leaves(name, arg):
    path = os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else "")
    config, _, _ = cli.parse(["vllama-train", "--config", path, "--workdir", "/tmp/unused"])
    assert config.task.builder == "vllama_jax.train.video_llama_task:build_task"
    branch = video_llama.BRANCHES[config.model.train_branch]
    # The 7B/13B presets shrunk to the tiny towers: the branch choice and the key map's structure
    # stay, and the abstract init costs seconds.
    config = config_lib.tiny(config)
    task = build_task(config)
    assert task.branch == branch.name
    assert task.config.num_media_tokens(task.media) == int(config.data.num_query_placeholders)

    # The trainer's partition and its optimizer state (loop._setup, as a run builds them).
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    su = loop._setup(config, task, mesh)
    trained = set(su.paths)
    assert {p.split("/")[0] for p in trained} == set(branch.trains)
    mu = su.abstract_state.opt_state[0].mu
    assert set(partition.flatten(mu)) == trained

    # The converter exports exactly the trained subtrees, and its keys feed exactly those leaves.
    trainable, _ = partition.split(task.abstract_params(), su.paths)
    components = convert.export_components(trainable, task.config)
    cli_branch = {"vision": "video", "audio": "audio"}[branch.name]
    assert components == convert.BRANCHES[cli_branch]
    exported = {"/".join(p) for c in components for e in convert.component_entries(task.config, c) for p in e.paths}
    assert exported == trained

    # The feature cache caches frozen towers only: no trained leaf under them.
    for o in feature_cache.outputs_for_media(task.media):
        assert not any(p.split("/")[0] == o.path[0] for p in trained)


def test_branch_patterns_pick_the_branches():
    config = video_llama.VideoLlamaConfig.preset("tiny")
    params = jax.eval_shape(lambda r: video_llama.abstract_or_init(config, r), jax.random.PRNGKey(0))["params"]
    for b in video_llama.BRANCHES.values():
        paths = partition.trainable_paths(params, b.trainable_patterns())
        assert sorted({p.split("/")[0] for p in paths}) == sorted(b.trains)
        # The optional collection prefix.
        assert partition.trainable_paths({"params": params}, b.trainable_patterns()) == {
            "params/" + p for p in paths}
    trainable, frozen = partition.split(params, video_llama.BRANCHES["vision"].trainable_patterns())
    assert "query_tokens" in trainable["video_qformer"]            # the video queries train
    assert "image_encoder" in frozen and "llama" in frozen           # BLIP-2 (with its queries), LLM
    assert not any(k.startswith("audio") for k in trainable)
    # A branch's name does not match a longer one (`llama_proj` vs `audio_llama_proj`).
    assert "audio_llama_proj" in frozen


def test_towers_and_token_counts_come_from_the_declaration():
    config = video_llama.VideoLlamaConfig.preset("tiny")
    assert config.num_video_tokens == config.video_qformer.num_query_tokens
    assert config.num_audio_tokens == config.audio_qformer.num_query_tokens
    assert video_llama.branch_of("audio_from_frames").name == "audio"
    with pytest.raises(ValueError, match="unknown medium"):
        video_llama.branch_of("text")
    assert [o.key for o in feature_cache.outputs_for_media(("audio", "video"))] == ["audio_features",
                                                                                    "image_features"]
    no_audio = config.replace(audio_qformer=None, imagebind_audio=None, imagebind_vision=None)
    assert config.has_audio and not no_audio.has_audio and no_audio.num_audio_tokens == 0


def test_train_branch_is_checked():
    config = config_lib.tiny(config_lib.video_llama("vision", 1, "vicuna7b"))
    config.model.train_branch = "both"
    with pytest.raises(ValueError, match="train_branch must be one of"):
        build_task(config)
    config.model.train_branch = "audio"
    with pytest.raises(ValueError, match="equip_audio_branch"):
        build_task(config)
    # freeze.patterns add to the branch's own.
    config.model.train_branch = "vision"
    config.freeze.patterns = ("image_encoder/qformer/.*",)
    patterns = trainable_patterns(config, build_task(config))
    assert patterns[-1] == "image_encoder/qformer/.*" and len(patterns) == 4
