import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from vllama_jax.convert.lavis import (blip2_image_encoder_params_from_state_dict, expected_keys,
                                      qformer_entries, qformer_params_from_state_dict)
from vllama_jax.models.blip2 import Blip2ImageEncoder
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.models.vit import EvaViT, EvaViTConfig

import lavis_reference as ref

torch = ref.torch


@functools.lru_cache(maxsize=None)
def _forward(config):
    return jax.jit(lambda p, s, m: QFormer(config).apply({"params": p}, s, m))


@functools.lru_cache(maxsize=None)
def _train_forward(config):
    return jax.jit(lambda p, s, key: QFormer(config).apply({"params": p}, s, deterministic=False,
                                                           rngs={"dropout": key}))


def _apply(config, params, states, mask=None):
    return _forward(config)(params, jnp.asarray(states), None if mask is None else jnp.asarray(mask))


def _reference(name, seed=0):
    config = QFormerConfig.preset(name)
    hf = ref.hf_qformer(config, seed)
    sd = ref.lavis_qformer_state_dict(hf, seed=seed, num_query=config.num_query_tokens)
    params, report = qformer_params_from_state_dict(sd, config)
    assert not report.unmatched and not report.ignored
    return config, hf, sd, params


@pytest.mark.parametrize("name", ["tiny", "tiny_video", "tiny_audio"])
def test_parity_with_hf_blip2_qformer(name, rng):
    config, hf, sd, params = _reference(name)
    states = rng.normal(size=(3, 7, config.encoder_width)).astype(np.float32)
    mask = np.ones((3, 7), np.int32)
    mask[1, 4:] = 0  # padded samples
    mask[2, :2] = 0
    out = _apply(config, params, states, mask)
    assert out.shape == (3, config.num_query_tokens, config.hidden_size)
    expected = ref.run_hf_qformer(hf, sd["query_tokens"], states, mask)
    assert np.abs(expected).max() > 1.0
    assert_close(out, expected, atol=1e-4, what=f"{name} with a padded encoder mask")
    # The padding is really used: changing padded features changes nothing, unpadded ones do.
    poked = states.copy()
    poked[1, 5:] += 3.0
    assert_close(_apply(config, params, poked, mask), out, atol=1e-6)
    assert not np.allclose(_apply(config, params, poked, np.ones_like(mask)),
                           _apply(config, params, states, np.ones_like(mask)), atol=1e-3)


def test_mask_forms_agree(rng):
    """No mask == all-ones mask (what LAVIS passes), bool mask == 0/1 mask, both vs HF without a mask."""
    config, hf, sd, params = _reference("tiny")
    states = rng.normal(size=(2, 5, config.encoder_width)).astype(np.float32)
    no_mask = _apply(config, params, states)
    assert_close(no_mask, ref.run_hf_qformer(hf, sd["query_tokens"], states), atol=1e-4, what="no mask")
    assert_close(_apply(config, params, states, np.ones((2, 5), np.int32)), no_mask, atol=1e-6)
    mask = np.array([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]], np.int32)
    assert_close(_apply(config, params, states, mask.astype(bool)), _apply(config, params, states, mask), atol=0)


@pytest.mark.parametrize("name, layers, freq, queries, width", [
    ("blip2_qformer", 12, 2, 32, 1408), ("video_qformer", 2, 1, 32, 768), ("audio_qformer", 2, 1, 8, 1024)])
def test_real_presets_match_hf_layout(name, layers, freq, queries, width):
    """Real-size structure: our key map's shapes equal an HF Q-Former's (built on the meta device)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    config = QFormerConfig.preset(name)
    assert (config.num_layers, config.cross_attention_freq, config.num_query_tokens, config.encoder_width) == (
        layers, freq, queries, width)
    assert (config.hidden_size, config.num_heads, config.intermediate_size, config.layer_norm_eps) == (
        768, 12, 3072, 1e-12)
    with torch.device("meta"):
        hf = Blip2QFormerModel(Blip2QFormerConfig(num_hidden_layers=layers, cross_attention_frequency=freq,
                                                  encoder_hidden_size=width))
    hf_shapes = {ref.hf_to_lavis_key(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    ours = expected_keys(qformer_entries(config))
    assert ours.pop("query_tokens") == (1, queries, 768)
    assert ours == hf_shapes
    abstract = jax.eval_shape(QFormer(config).init, jax.random.key(0), jnp.zeros((1, 4, width)))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    assert n_ours == sum(int(np.prod(s)) for s in hf_shapes.values()) + queries * 768


def test_dropout_only_when_not_deterministic(rng):
    config = QFormerConfig.preset("tiny_video", num_layers=1)
    states = rng.normal(size=(2, 5, config.encoder_width)).astype(np.float32)
    params = nn.meta.unbox(jax.jit(QFormer(config).init)(jax.random.key(0), states))["params"]
    eval_out = _apply(config, params, states)
    train = lambda cfg, seed: _train_forward(cfg)(params, states, jax.random.key(seed))
    a, b = train(config, 0), train(config, 1)
    assert np.all(np.isfinite(a))
    assert not np.allclose(a, eval_out, atol=1e-3) and not np.allclose(a, b, atol=1e-3)
    no_drop = dataclasses.replace(config, hidden_dropout=0.0, attention_dropout=0.0)
    assert_close(train(no_drop, 0), eval_out, atol=1e-6)
    attn_only = dataclasses.replace(config, hidden_dropout=0.0, attention_dropout=0.5)
    assert not np.allclose(train(attn_only, 0), eval_out, atol=1e-3)


def test_bf16_forward_close_to_fp32(rng):
    config, _, _, params = _reference("tiny")
    states = rng.normal(size=(2, 6, config.encoder_width)).astype(np.float32)
    fp32 = _apply(config, params, states)
    bf16_cfg = dataclasses.replace(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = _apply(bf16_cfg, jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params), states)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - fp32)))
    assert err < 0.1, err  # post-LayerNorm outputs are O(1)


def test_remat_same_output(rng):
    config, _, _, params = _reference("tiny_video")
    states = rng.normal(size=(2, 5, config.encoder_width)).astype(np.float32)
    out = _apply(dataclasses.replace(config, remat=True), params, states)
    assert_close(out, _apply(config, params, states), atol=1e-6)


def test_bad_inputs_raise():
    config = QFormerConfig.preset("tiny")
    model = QFormer(config)
    with pytest.raises(ValueError, match=r"encoder_hidden_states: expected \[N, L, 64\]"):
        model.init(jax.random.key(0), jnp.zeros((2, 5, 32)))
    with pytest.raises(ValueError, match=r"encoder_mask: expected shape \[N, L\] = \(2, 5\)"):
        model.init(jax.random.key(0), jnp.zeros((2, 5, 64)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        QFormerConfig.preset("tiny", num_heads=5)
    with pytest.raises(ValueError, match="encoder_width 64 != vit_config.width 48"):
        Blip2ImageEncoder(EvaViTConfig.preset("tiny", width=48), config)


def test_blip2_image_encoder_matches_torch_pipeline(rng):
    """EVA ViT -> ln_vision (fp32 LayerNorm, eps 1e-5) -> image Q-Former, as Video-LLaMA runs each frame."""
    vit_cfg, qf_cfg = EvaViTConfig.preset("tiny"), QFormerConfig.preset("tiny")
    vit = ref.eva_vit(vit_cfg)
    ln_vision = ref.randomize_(torch.nn.LayerNorm(vit_cfg.width), seed=3)
    ln_vision.weight.data += 1.0  # LayerNorm scale around 1
    hf = ref.hf_qformer(qf_cfg)
    sd = {f"visual_encoder.{k}": v.numpy() for k, v in vit.state_dict().items()}
    sd.update({f"ln_vision.{k}": v.detach().numpy() for k, v in ln_vision.state_dict().items()})
    sd.update(ref.lavis_qformer_state_dict(hf, num_query=qf_cfg.num_query_tokens))
    params, report = blip2_image_encoder_params_from_state_dict(sd, vit_cfg, qf_cfg)
    assert not report.unmatched and not report.ignored and len(report.loaded) == len(sd)
    images = rng.normal(size=(2, 28, 28, 3)).astype(np.float32)
    out = jax.jit(Blip2ImageEncoder(vit_cfg, qf_cfg).apply)({"params": params}, jnp.asarray(images))
    with torch.no_grad():
        feats = ln_vision(torch.from_numpy(ref.run_eva_vit(vit, images)))
    expected = ref.run_hf_qformer(hf, sd["query_tokens"], feats.numpy(), np.ones(feats.shape[:2]))
    assert out.shape == (2, qf_cfg.num_query_tokens, qf_cfg.hidden_size)
    assert_close(out, expected, atol=1e-4, what="Blip2ImageEncoder vs torch")
    # LAVIS' ln_vision is a torch.nn.LayerNorm subclass with the default eps (too small to show above).
    assert Blip2ImageEncoder(vit_cfg, qf_cfg).ln_vision_eps == torch.nn.LayerNorm(8).eps == 1e-5
    abstract = jax.eval_shape(Blip2ImageEncoder(vit_cfg, qf_cfg).init, jax.random.key(0), images)
    assert jax.tree.structure(nn.meta.unbox(abstract)["params"]) == jax.tree.structure(params)


@pytest.mark.slow
@pytest.mark.ci
def test_blip2_image_encoder_real_size():
    model = Blip2ImageEncoder(EvaViTConfig.preset("eva_vit_g"), QFormerConfig.preset("blip2_qformer"))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 224, 224, 3)), jnp.float32)
    t0 = time.perf_counter()
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, images)))(jax.random.key(0))["params"]
    t1 = time.perf_counter()
    tokens = jax.jit(EvaViT(model.vit_config).apply)({"params": params["visual_encoder"]}, images)
    out = jax.jit(model.apply)({"params": params}, images)
    out.block_until_ready()
    t2 = time.perf_counter()
    print(f"real-size init {t1 - t0:.1f}s, ViT + full forward {t2 - t1:.1f}s")
    assert tokens.shape == (1, 257, 1408) and out.shape == (1, 32, 768)
    assert np.all(np.isfinite(np.asarray(tokens))) and np.all(np.isfinite(np.asarray(out)))
