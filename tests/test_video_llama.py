"""The composite model equals a hand-assembled chain of the (separately parity-tested) towers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_close
from vllama_jax.models.blip2 import Blip2ImageEncoder
from vllama_jax.models.imagebind import ImageBindAudio, ImageBindVision
from vllama_jax.models.llama import Llama
from vllama_jax.models.qformer import QFormer
from vllama_jax.models.video_llama import (VideoLlama, VideoLlamaConfig, causal_lm_loss, check_media_mask,
                                           init_params, splice_media)

CFG = VideoLlamaConfig.preset("tiny")
B, T, M, L = 2, 3, 2, 64


@functools.lru_cache(maxsize=None)
def _params():
    return jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))["params"]


def _batch(media=("video",), seed=0, frames=T):
    rng = np.random.default_rng(seed)
    k = CFG.num_media_tokens(media)
    media_mask = np.zeros((B, L), bool)
    media_mask[0, 3:3 + k] = True
    media_mask[1, 5:5 + k] = True
    attention_mask = np.ones((B, L), np.int32)
    attention_mask[1, -4:] = 0
    targets = rng.integers(3, CFG.llama.vocab_size, (B, L)).astype(np.int32)
    targets[:, :5 + k] = -100
    return {
        "frames": jnp.asarray(rng.normal(size=(B, frames, 28, 28, 3)), jnp.float32),
        "frame_mask": jnp.ones((B, frames), bool),
        "audio": jnp.asarray(rng.normal(size=(B, M, 1, 128, 204)), jnp.float32),
        "input_ids": jnp.asarray(rng.integers(3, CFG.llama.vocab_size, (B, L)), jnp.int32),
        "attention_mask": jnp.asarray(attention_mask),
        "targets": jnp.asarray(targets),
        "media_mask": jnp.asarray(media_mask),
    }


def _apply(method, *args, **kwargs):
    fn = jax.jit(lambda p, *a: VideoLlama(CFG).apply({"params": p}, *a, method=method, **kwargs))
    return fn(_params(), *args)


def _manual_video_tokens(p, frames):
    n = frames.shape[0] * frames.shape[1]
    q = Blip2ImageEncoder(CFG.vit, CFG.image_qformer).apply(
        {"params": p["image_encoder"]}, frames.reshape(n, *frames.shape[2:]))
    q = q.reshape(frames.shape[0], frames.shape[1], *q.shape[1:])
    q = q + p["video_frame_position_embedding"][: frames.shape[1]][None, :, None, :]
    v = QFormer(CFG.video_qformer).apply({"params": p["video_qformer"]}, q.reshape(q.shape[0], -1, q.shape[-1]))
    return v @ p["llama_proj"]["kernel"] + p["llama_proj"]["bias"]


def _manual_audio_tokens(p, emb):
    emb = emb + p["audio_position_embedding"][: emb.shape[1]][None]
    a = QFormer(CFG.audio_qformer).apply({"params": p["audio_qformer"]}, emb)
    return a @ p["audio_llama_proj"]["kernel"] + p["audio_llama_proj"]["bias"]


def test_video_forward_and_loss_equal_hand_assembled_chain():
    p, batch = _params(), _batch()
    soft = jax.jit(_manual_video_tokens)(p, batch["frames"])
    llama = Llama(CFG.llama)
    embeds = np.array(jax.jit(lambda lp, ids: llama.apply({"params": lp}, ids, method=Llama.embed))(
        p["llama"], batch["input_ids"]))
    for b in range(B):
        pos = np.nonzero(np.asarray(batch["media_mask"][b]))[0]
        embeds[b, pos] = np.asarray(soft[b])
    logits = jax.jit(lambda lp, e, m: llama.apply({"params": lp}, inputs_embeds=e, attention_mask=m).logits)(
        p["llama"], jnp.asarray(embeds), batch["attention_mask"])
    out = _apply(VideoLlama.__call__, batch, media=("video",))
    assert_close(out.logits, logits, atol=1e-5, what="logits")

    # HF LlamaForCausalLM loss: shift by one, mean over non-ignored labels.
    lg, lb = np.asarray(logits)[:, :-1], np.asarray(batch["targets"])[:, 1:]
    valid = lb != -100
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(lg), jnp.asarray(np.where(valid, lb, 0)))
    expected = float(np.sum(np.where(valid, ce, 0)) / valid.sum())
    loss, aux = _apply(VideoLlama.loss, batch, media=("video",))
    assert abs(float(loss) - expected) < 1e-5
    assert int(aux["num_tokens"]) == valid.sum()


def test_audio_and_audio_from_frames_branches_equal_chain():
    p, batch = _params(), _batch(media=("audio", "video"))
    manual = jax.jit(_manual_audio_tokens)
    emb = jax.jit(ImageBindAudio(CFG.imagebind_audio).apply)(
        {"params": p["audio_encoder"]}, batch["audio"].reshape(B * M, 1, 128, 204)).reshape(B, M, -1)
    assert_close(_apply(VideoLlama.encode_audio, batch["audio"]), manual(p, emb), atol=1e-5,
                 what="audio tokens")
    emb = jax.jit(ImageBindVision(CFG.imagebind_vision).apply)(
        {"params": p["audio_vision_encoder"]}, batch["frames"].reshape(B * T, 28, 28, 3)).reshape(B, T, -1)
    assert_close(_apply(VideoLlama.encode_audio_from_frames, batch["frames"]), manual(p, emb),
                 atol=1e-5, what="audio-from-frames tokens")
    # Audio tokens come first, then video, in the order the media were asked for.
    soft = _apply(VideoLlama.encode_media, batch, media=("audio", "video"))
    assert soft.shape == (B, CFG.num_audio_tokens + CFG.num_video_tokens, CFG.llama.hidden_size)
    assert_close(soft[:, :CFG.num_audio_tokens], _apply(VideoLlama.encode_audio, batch["audio"]), atol=1e-6)


def test_padded_frames_masked_equal_single_frame_image():
    image = _batch(frames=1)
    padded = dict(image, frames=jnp.concatenate([image["frames"], jnp.ones((B, 3, 28, 28, 3))], axis=1),
                  frame_mask=jnp.asarray([[True, False, False, False]] * B))
    one = _apply(VideoLlama.encode_video, image["frames"], image["frame_mask"])
    four = _apply(VideoLlama.encode_video, padded["frames"], padded["frame_mask"])
    assert_close(four, one, atol=1e-5, what="masked padded frames vs 1 frame")
    unmasked = _apply(VideoLlama.encode_video, padded["frames"], jnp.ones((B, 4), bool))
    assert float(jnp.max(jnp.abs(unmasked - one))) > 1e-3


def test_splice_places_soft_tokens_in_order():
    embeds = jnp.zeros((2, 6, 3))
    soft = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3) + 1
    mask = jnp.asarray([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]], bool)
    out = np.asarray(splice_media(embeds, soft, mask))
    np.testing.assert_array_equal(out[0, 1:3], soft[0])
    np.testing.assert_array_equal(out[1, 4:6], soft[1])
    assert not out[0, [0, 3, 4, 5]].any() and not out[1, :4].any()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="media positions, expected 8"):
        check_media_mask(np.zeros((2, 10), bool), 8)
    batch = _batch()
    with pytest.raises(ValueError, match="frames must be"):
        _apply(VideoLlama.encode_video, batch["frames"][..., :2])
    with pytest.raises(ValueError, match="exceed max_frame_pos"):
        _apply(VideoLlama.encode_video, jnp.zeros((1, 33, 28, 28, 3)))
    with pytest.raises(ValueError, match="encoder_width"):
        CFG.replace(video_qformer=CFG.video_qformer.__class__.preset("tiny_video", encoder_width=7))


def test_real_size_param_counts():
    shapes = jax.eval_shape(lambda r: init_params(VideoLlamaConfig.preset("vicuna7b"), r), jax.random.key(0))
    counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in shapes["params"].items()}
    assert counts["llama"] == 6_738_415_616
    assert 0.98e9 < counts["image_encoder"] - 105_000_000 < 1.0e9  # EVA ViT-g/14 (39 blocks) ~986M
    assert counts["llama_proj"] == 768 * 4096 + 4096
    assert counts["audio_position_embedding"] == 8 * 1024
    assert counts["video_frame_position_embedding"] == 32 * 768
