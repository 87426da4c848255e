"""LLaMA family: parity with transformers, KV-cache decode, sharding, param counts, input checks."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_reference as ref
from conftest import assert_close
from vllama_jax import sharding
from vllama_jax.convert.hf_llama import load_hf
from vllama_jax.models.llama import (KVCache, Llama, LlamaConfig, cache_shardings, init_cache,
                                     rope_inv_freq)

VARIANTS = {"gqa": dict(kv_heads=2), "mha": dict(kv_heads=4),
            "llama3_rope": dict(kv_heads=2, llama3_scaling=True)}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """variant -> (HF model, our config, our params), loaded through the safetensors converter."""
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        model = ref.hf_model(seed=i, **kw)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        config, params = load_hf(d, progress=False)
        assert config == ref.our_config(**kw)
        out[name] = (model, config, params)
    return out


def _apply(config, params, *args, **kw):
    return Llama(config).apply({"params": params}, *args, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_logits_match_transformers(loaded, variant, rng):
    model, config, params = loaded[variant]
    ids, mask = ref.padded_batch(rng)
    expected, expected_hidden = ref.hf_logits(model, ids, mask, hidden=True)
    out = _apply(config, params, jnp.asarray(ids), jnp.asarray(mask), return_hidden=True)
    err = ref.max_err_on_tokens(out.logits, expected, mask)
    print(f"{variant}: max abs logit err {err:.2e} (logit scale {np.abs(expected).max():.1f})")
    assert err <= 1e-4
    assert ref.max_err_on_tokens(out.hidden_states, expected_hidden, mask) <= 1e-4


def test_explicit_positions_match_transformers(loaded, rng):
    """Spread-out positions (distances up to ~100) exercise the Llama-3 scaled frequencies; RoPE is
    relative, so a constant offset alone would not change anything."""
    model, config, params = loaded["llama3_rope"]
    ids, mask = ref.padded_batch(rng)
    positions = (ref.hf_positions(mask) * 9 + 5).astype(np.int32)
    expected = ref.hf_logits(model, ids, mask, positions)
    out = _apply(config, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
    assert ref.max_err_on_tokens(out.logits, expected, mask) <= 1e-4
    # and the positions really matter
    shifted = _apply(config, params, jnp.asarray(ids), jnp.asarray(mask))
    assert ref.max_err_on_tokens(shifted.logits, expected, mask) > 1e-2


def test_rope_inv_freq_matches_transformers_llama31():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    ours = LlamaConfig.preset("llama3_1_8b")
    s = ours.rope_scaling
    hf = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": s.factor,
                         "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                         "original_max_position_embeddings": s.original_max_position_embeddings})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    np.testing.assert_allclose(rope_inv_freq(ours), expected.numpy(), rtol=1e-6)
    plain = rope_inv_freq(LlamaConfig.preset("llama3_8b"))
    assert np.sum(~np.isclose(plain, expected.numpy(), rtol=1e-6)) > 10  # scaling changed most of them


def test_inputs_embeds_and_embed_method_match_ids(loaded, rng):
    _, config, params = loaded["gqa"]
    params = {"params": params}
    model = Llama(config)
    ids, mask = (jnp.asarray(a) for a in ref.padded_batch(rng))
    embeds = model.apply(params, ids, method=Llama.embed)
    assert embeds.shape == (3, 12, config.hidden_size)
    np.testing.assert_array_equal(embeds[0, 0], params["params"]["embed_tokens"]["embedding"][ids[0, 0]])
    a = model.apply(params, ids, mask).logits
    b = model.apply(params, attention_mask=mask, inputs_embeds=embeds).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_left_padding_does_not_change_real_tokens(loaded, rng):
    """A left-padded row gives the same logits as the same tokens unpadded (positions from the mask)."""
    _, config, params = loaded["gqa"]
    params = {"params": params}
    model = Llama(config)
    ids = jnp.asarray(rng.integers(0, 256, size=(1, 8)), jnp.int32)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 8), jnp.int32)], axis=1)
    apply = jax.jit(model.apply)
    assert_close(apply(params, padded, mask).logits[:, 3:], apply(params, ids).logits,
                 atol=1e-5, what="left padding")


def _decode_all(config, params, prompt, prompt_mask, new_tokens, max_len):
    """Prefill, then one token per `while_loop` step, as a generator runs it."""
    model = Llama(config)
    b, n = new_tokens.shape
    cache = init_cache(config, b, max_len)
    pre = jax.jit(lambda p, c: model.apply({"params": p}, prompt, prompt_mask, cache=c))(params, cache)

    def step(carry):
        t, cache, logits = carry
        tok = jax.lax.dynamic_slice_in_dim(new_tokens, t, 1, axis=1)
        out = model.apply({"params": params}, tok, jnp.ones_like(tok), cache=cache)
        return t + 1, out.cache, jax.lax.dynamic_update_slice_in_dim(logits, out.logits, t, axis=1)

    carry = (jnp.int32(0), pre.cache, jnp.zeros((b, n, config.vocab_size), jnp.float32))
    _, cache, logits = jax.jit(lambda c: jax.lax.while_loop(lambda c: c[0] < n, step, c))(carry)
    return pre.logits, logits, cache


@pytest.mark.parametrize("variant", ["gqa", "llama3_rope"])
def test_kv_cache_prefill_and_decode_match_full_forward(loaded, variant, rng):
    _, config, params = loaded[variant]
    b, p, n = 3, 6, 8
    prompt = rng.integers(0, 256, size=(b, p)).astype(np.int32)
    prompt_mask = np.ones((b, p), np.int32)
    prompt_mask[1, :2] = 0   # left padded
    prompt_mask[2, :5] = 0   # a single real prompt token
    new = rng.integers(0, 256, size=(b, n)).astype(np.int32)
    full_ids = np.concatenate([prompt, new], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((b, n), np.int32)], axis=1)
    full = np.asarray(_apply(config, params, jnp.asarray(full_ids), jnp.asarray(full_mask)).logits)

    pre, dec, cache = _decode_all(config, params, jnp.asarray(prompt), jnp.asarray(prompt_mask),
                                  jnp.asarray(new), max_len=p + n + 2)
    err_pre = ref.max_err_on_tokens(pre, full[:, :p], prompt_mask)
    err_dec = float(np.max(np.abs(np.asarray(dec) - full[:, p:])))
    print(f"{variant}: prefill err {err_pre:.2e}, decode err {err_dec:.2e}")
    assert err_pre <= 1e-4 and err_dec <= 1e-4
    assert int(cache.index) == p + n
    np.testing.assert_array_equal(np.asarray(cache.mask[:, :p + n]), full_mask.astype(bool))
    assert not np.asarray(cache.mask[:, p + n:]).any()


def test_cache_overflow_and_bad_inputs_raise(loaded):
    _, config, params = loaded["gqa"]
    params = {"params": params}
    model = Llama(config)
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="overflows the cache"):
        model.apply(params, ids, cache=init_cache(config, 2, 3))
    with pytest.raises(ValueError, match="cache k/v must be"):
        model.apply(params, ids, cache=init_cache(config, 3, 8))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, length\] = \(2, 4\)"):
        model.apply(params, ids, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model.apply(params, ids, inputs_embeds=jnp.zeros((2, 4, 64)))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, length, 64\]"):
        model.apply(params, inputs_embeds=jnp.zeros((2, 4, 32)))
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig.preset("tiny", num_kv_heads=3)


def test_sharded_forward_and_decode_equal_single_device(loaded, rng):
    _, config, params = loaded["gqa"]
    ids, mask = ref.padded_batch(rng, batch=4)
    model = Llama(config)
    expected = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))

    mesh = sharding.make_mesh((2, 2, 2))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ids))
    shardings = sharding.param_shardings(abstract, mesh)
    q_spec = shardings["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec
    assert tuple(q_spec) == ("fsdp", "tensor")
    variables = jax.device_put({"params": params}, shardings)
    batch = sharding.shard_batch({"ids": ids, "mask": mask}, mesh)
    apply = sharding.with_rules(lambda v, b: model.apply(v, b["ids"], b["mask"]))
    cache = init_cache(config, 4, 16)
    cache = jax.device_put(cache, cache_shardings(cache, mesh))
    step = jax.jit(sharding.with_rules(lambda v, b, c: model.apply(v, b["ids"], b["mask"], cache=c)))
    with jax.set_mesh(mesh):  # activation constraints only bind with a mesh in context
        out = jax.jit(apply)(variables, batch)
        sharded = step(variables, batch, cache)
    assert tuple(out.logits.sharding.spec) == (("data", "fsdp"), None, "tensor")
    assert_close(out.logits, expected.logits, atol=1e-5, what="sharded forward")
    # a prefill computes exactly what the full forward does (the extra cache slots are masked)
    assert_close(sharded.logits, expected.logits, atol=1e-5, what="sharded prefill")
    assert isinstance(sharded.cache, KVCache)
    assert sharded.cache.k[0].sharding.spec[2] == "tensor"


def test_remat_gives_same_loss_and_grads(loaded, rng):
    ids = jnp.asarray(rng.integers(0, 256, size=(2, 6)), jnp.int32)
    _, config, params = loaded["gqa"]
    config = dataclasses.replace(config, num_layers=1)  # one layer keeps the two compiles cheap
    params = {"params": {k: v for k, v in params.items() if k != "layers_1"}}

    def loss(p, cfg):
        return jnp.mean(Llama(cfg).apply(p, ids).logits ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    plain = grad(params, config)
    remat = grad(params, dataclasses.replace(config, remat=True))
    assert_close(remat[0], plain[0], atol=1e-6)
    for a, b in zip(jax.tree.leaves(remat[1]), jax.tree.leaves(plain[1])):
        assert_close(a, b, atol=1e-6)


def test_bf16_compute_runs_close_to_fp32(loaded, rng):
    ids, mask = (jnp.asarray(a) for a in ref.padded_batch(rng))
    _, config, params = loaded["gqa"]
    fp32 = _apply(config, params, ids, mask).logits
    bf16 = _apply(dataclasses.replace(config, dtype=jnp.bfloat16), params, ids, mask).logits
    assert bf16.dtype == jnp.float32  # logits are always handed out in float32
    err = ref.max_err_on_tokens(bf16, fp32, np.asarray(mask))
    assert 0 < err < 0.05 * float(jnp.abs(fp32).max())


@pytest.mark.parametrize("name,count", [("llama_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320),
                                        ("llama3_8b", 8_030_261_248), ("llama3_1_8b", 8_030_261_248)])
def test_real_size_param_counts(name, count):
    model = Llama(LlamaConfig.preset(name))
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(nn.meta.unbox(abstract))) == count
    specs = nn.get_partition_spec(abstract)["params"]
    assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
    assert tuple(specs["layers_0"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
