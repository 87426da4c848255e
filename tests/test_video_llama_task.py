"""The Video-LLaMA task built from the stage configs: right towers, right media, right trainable split."""
import jax
import numpy as np
import pytest

from vllama_jax.train import config_lib, partition
from vllama_jax.train.task import build_task, trainable_patterns
from vllama_jax.train.video_llama_task import train_media


def _tiny(branch, stage=1):
    return config_lib.tiny(config_lib.video_llama(branch, stage, "vicuna7b"))


@pytest.mark.parametrize("branch,media,trained", [
    ("vision", ("video",), {"video_qformer", "video_frame_position_embedding", "llama_proj"}),
    ("audio", ("audio_from_frames",), {"audio_qformer", "audio_position_embedding", "audio_llama_proj"}),
])
def test_stage_configs_train_only_their_branch(branch, media, trained):
    config = _tiny(branch)
    task = build_task(config)
    assert task.media == media
    abstract = task.abstract_params()
    trainable, frozen = partition.split(abstract, trainable_patterns(config, task))
    assert set(trainable) == trained
    assert {"llama", "image_encoder"} <= set(frozen)
    assert ("audio_encoder" in frozen) == (branch == "audio")
    # The reference's query-token counts come through the config.
    q = abstract["video_qformer"]["query_tokens"]
    assert q.value.shape[1] == config.model.num_video_query_token


def test_one_branch_trains_per_run():
    config = _tiny("vision")
    config.model.equip_audio_branch = True
    config.model.train_branch = "vision,audio"   # the reference's train_flag 2: not defined
    with pytest.raises(ValueError, match="train_branch must be one of"):
        train_media(config)


def test_train_with_media_puts_frozen_media_beside_the_trained_one():
    config = _tiny("audio")
    config.model.audio_train_input = "audio"
    assert train_media(config) == ("audio",)
    config.model.train_with_media = ("video",)
    assert train_media(config) == ("audio", "video")          # the chat's order
    for bad in (("audio",), ("video", "video"), ("depth",)):
        config.model.train_with_media = bad
        with pytest.raises(ValueError, match="train_with_media"):
            train_media(config)


def _zero_params(task):
    """The task's whole param tree, unboxed, as zeros of the right shapes and dtypes."""
    import flax.linen as nn

    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.meta.unbox(task.abstract_params()))


def test_ckpt_and_ckpt_2_both_start_the_run(tmp_path):
    """A run holding both branches starts from two earlier runs: `paths.ckpt` and `paths.ckpt_2`
    (the reference's names), the second applied after the first."""
    from vllama_jax.convert import params_checkpoint

    config = _tiny("audio", 2)
    config.model.audio_train_input = "audio"
    task = build_task(config)
    params = _zero_params(task)
    video = {k: jax.tree.map(lambda x: np.full(x.shape, 1, x.dtype), params[k])
             for k in ("video_qformer", "llama_proj")}
    audio = {k: jax.tree.map(lambda x: np.full(x.shape, 2, x.dtype), params[k])
             for k in ("audio_qformer", "audio_llama_proj")}
    both_proj = {"llama_proj": jax.tree.map(lambda x: np.full(x.shape, 3, x.dtype), params["llama_proj"])}
    config.paths.ckpt = str(params_checkpoint.save_params(tmp_path / "vision", video))
    config.paths.ckpt_2 = str(params_checkpoint.save_params(tmp_path / "audio", {**audio, **both_proj}))
    task = build_task(config)
    assert {"video_qformer", "llama_proj", "audio_qformer", "audio_llama_proj"} <= set(task.pretrained_subtrees())
    started = task.load_pretrained(params)
    for name, value in (("video_qformer", 1), ("audio_qformer", 2), ("audio_llama_proj", 2), ("llama_proj", 3)):
        assert all(np.all(np.asarray(x) == value) for x in jax.tree.leaves(started[name])), name
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(started["audio_position_embedding"]))


def test_llama_proj_model_initialises_llama_proj(tmp_path):
    """`paths.llama_proj_model` (MiniGPT-4's `llama_proj.*` alone, the reference's stage 1) replaces
    llama_proj's init; a later `ckpt` wins over it, as the reference loads its ckpt afterwards."""
    from vllama_jax.convert import params_checkpoint
    from vllama_jax.convert.common import save_state_dict

    config = _tiny("vision", 1)
    task = build_task(config)
    params = _zero_params(task)
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(params["llama_proj"]["kernel"].shape).astype(np.float32)
    bias = rng.standard_normal(params["llama_proj"]["bias"].shape).astype(np.float32)
    path = tmp_path / "minigpt4.safetensors"
    save_state_dict(path, {"llama_proj.weight": kernel.T.copy(), "llama_proj.bias": bias})
    config.paths.llama_proj_model = str(path)
    task = build_task(config)
    assert "llama_proj" in task.pretrained_subtrees()
    started = task.load_pretrained(params)
    np.testing.assert_array_equal(started["llama_proj"]["kernel"], kernel)
    np.testing.assert_array_equal(started["llama_proj"]["bias"], bias)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(started["video_qformer"]))

    later = {"llama_proj": {"kernel": np.ones_like(kernel), "bias": np.ones_like(bias)}}
    config.paths.ckpt = str(params_checkpoint.save_params(tmp_path / "stage1", later))
    started = build_task(config).load_pretrained(params)
    np.testing.assert_array_equal(started["llama_proj"]["kernel"], later["llama_proj"]["kernel"])

    config.paths.ckpt = ""
    save_state_dict(tmp_path / "wrong.safetensors", {"llama_proj.weight": kernel, "llama_proj.bias": bias})
    config.paths.llama_proj_model = str(tmp_path / "wrong.safetensors")
    with pytest.raises(Exception, match=r"wrong\.safetensors.*llama_proj\.weight.*shape"):
        build_task(config).load_pretrained(params)


def test_a_missing_ckpt_2_is_named():
    config = _tiny("audio", 2)
    config.model.audio_train_input = "audio"
    config.paths.ckpt_2 = "/nonexistent/vision2_run"
    with pytest.raises(Exception, match="/nonexistent/vision2_run.*does not exist"):
        build_task(config).pretrained_subtrees()
