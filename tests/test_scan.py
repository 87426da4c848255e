"""scan_layers: a scanned tower with stacked params computes what the per-layer one does."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from vllama_jax import sharding
from vllama_jax.convert import lavis
from vllama_jax.convert.hf_llama import load_hf, save_hf
from vllama_jax.models.llama import Llama, LlamaConfig, cache_shardings, init_cache
from vllama_jax.models.scan import stack_layers, unstack_layers
from vllama_jax.models.vit import EvaViT, EvaViTConfig

LLAMA = LlamaConfig.preset("tiny")
LLAMA_SCAN = dataclasses.replace(LLAMA, scan_layers=True)


@pytest.fixture(scope="module")
def llama_params():
    ids = jnp.zeros((1, 4), jnp.int32)
    return jax.jit(lambda r: nn.meta.unbox(Llama(LLAMA).init(r, ids)["params"]))(jax.random.key(0))


def _ids(rng, b=2, length=8):
    return jnp.asarray(rng.integers(0, LLAMA.vocab_size, (b, length)), jnp.int32)


def test_stack_unstack_round_trip_and_errors(llama_params):
    stacked = stack_layers(llama_params, "layers")
    assert "layers_0" not in stacked and stacked["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 64, 160)
    back = unstack_layers(stacked, "layers")
    assert jax.tree.structure(back) == jax.tree.structure(llama_params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(llama_params)):
        np.testing.assert_array_equal(a, b)
    numpy_tree = {"blocks_0": {"w": np.ones(2)}, "blocks_1": {"w": np.zeros(2)}}
    assert isinstance(stack_layers(numpy_tree, "blocks")["blocks"]["w"], np.ndarray)
    with pytest.raises(KeyError, match=r"numbering must be 0..1"):
        stack_layers({"blocks_0": {"w": np.ones(2)}, "blocks_2": {"w": np.ones(2)}}, "blocks")
    with pytest.raises(ValueError, match="shapes differ"):
        stack_layers({"blocks_0": {"w": np.ones(2)}, "blocks_1": {"w": np.ones(3)}}, "blocks")
    boxed = Llama(LLAMA).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    with pytest.raises(TypeError, match="unboxed"):
        stack_layers(boxed, "layers")
    with pytest.raises(KeyError, match="no stacked entry"):
        unstack_layers(llama_params, "layers")


def test_scanned_llama_params_carry_the_layers_axis():
    abstract = jax.eval_shape(Llama(LLAMA_SCAN).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    specs = nn.get_partition_spec(abstract)["params"]
    assert tuple(specs["layers"]["self_attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads")
    assert tuple(specs["layers"]["input_layernorm"]["scale"]) == ("layers", "embed")
    assert "layers_0" not in specs
    mesh = sharding.make_mesh((2, 2, 2))
    q = sharding.param_shardings(abstract, mesh)["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert tuple(q.spec) == (None, "fsdp", "tensor")


def test_scanned_llama_forward_cache_and_grads_equal_unrolled(llama_params, rng):
    ids = _ids(rng)
    mask = jnp.ones_like(ids).at[1, :2].set(0)
    stacked = stack_layers(llama_params, "layers")
    plain, scanned = Llama(LLAMA), Llama(LLAMA_SCAN)

    # prefill + one decode step through the stacked [layers, B, S, KV, D] cache, jitted (eager
    # dispatch of the tiny model's ops costs more than compiling it)
    def prefill_decode(params, cache, model):
        out = model.apply({"params": params}, ids, mask, cache=cache)
        nxt = model.apply({"params": params}, ids[:, :1], cache=out.cache)
        return out.logits, nxt.logits, nxt.cache

    prefill_decode = jax.jit(prefill_decode, static_argnums=2)
    c_plain, c_scan = init_cache(LLAMA, 2, 12), init_cache(LLAMA_SCAN, 2, 12)
    assert c_scan.k.shape == (2, 2, 12, 2, 16)
    p_full, p_dec, p_cache = prefill_decode(llama_params, c_plain, plain)
    s_full, s_dec, s_cache = prefill_decode(stacked, c_scan, scanned)
    assert_close(s_full, p_full, atol=1e-5, what="forward")
    assert_close(s_dec, p_dec, atol=1e-5, what="decode")
    np.testing.assert_allclose(np.asarray(s_cache.k[1]), np.asarray(p_cache.k[1]), atol=1e-5)
    with pytest.raises(ValueError, match="scan_layers"):
        jax.eval_shape(lambda p, c: scanned.apply({"params": p}, ids[:, :1], cache=c), stacked,
                       init_cache(LLAMA, 2, 12))

    def loss(params, model):
        return jnp.mean(model.apply({"params": params}, ids, mask).logits ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_plain = grad(llama_params, plain)
    for policy in ("full", "dots"):
        model = Llama(dataclasses.replace(LLAMA_SCAN, remat=True, remat_policy=policy))
        g_scan = unstack_layers(grad(stacked, model), "layers")
        for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_plain)):
            assert_close(a, b, atol=1e-6, what=f"grad with remat policy {policy}")


def test_stacked_cache_shardings():
    mesh = sharding.make_mesh((2, 2, 2))
    sh = cache_shardings(init_cache(LLAMA_SCAN, 4, 8), mesh)
    assert tuple(sh.k.spec) == (None, ("data", "fsdp"), None, "tensor", None)


def test_hf_import_export_with_scan_layers(llama_params, tmp_path):
    save_hf(llama_params, LLAMA, tmp_path / "plain", progress=False)
    _, stacked = load_hf(tmp_path / "plain", config=LLAMA_SCAN, progress=False)
    expected = stack_layers(llama_params, "layers")
    assert jax.tree.structure(stacked) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    # stacked params export to the same per-layer HF layout
    save_hf(stacked, LLAMA_SCAN, tmp_path / "scanned", progress=False)
    _, again = load_hf(tmp_path / "scanned", config=LLAMA, progress=False)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(llama_params)):
        np.testing.assert_array_equal(a, b)


def test_scanned_vit_equals_unrolled_and_keeps_the_per_layer_init(rng):
    cfg = EvaViTConfig.preset("tiny", depth=3)
    scfg = dataclasses.replace(cfg, scan_layers=True)
    images = jnp.asarray(rng.normal(size=(2, 28, 28, 3)), jnp.float32)
    params = jax.jit(lambda r: nn.meta.unbox(EvaViT(cfg).init(r, images)["params"]))(jax.random.key(0))
    apply = jax.jit(lambda p, model: model.apply({"params": p}, images), static_argnums=1)
    expected = apply(params, EvaViT(cfg))
    got = apply(stack_layers(params, "blocks"), EvaViT(scfg))
    assert_close(got, expected, atol=1e-6, what="scanned ViT")
    # LAVIS' fix_init_weight scales block i's residual outputs by 1/sqrt(2(i+1)) under scan too.
    wide = dataclasses.replace(scfg, width=256, num_heads=4)
    fresh = jax.eval_shape(EvaViT(wide).init, jax.random.key(1), images)
    assert tuple(nn.get_partition_spec(fresh)["params"]["blocks"]["fc2"]["kernel"]) == ("layers", "mlp", "embed")
    kernel = jax.jit(lambda r: nn.meta.unbox(EvaViT(wide).init(r, images))["params"]["blocks"]["fc2"]["kernel"])(
        jax.random.key(1))
    stds = np.asarray(kernel).reshape(3, -1).std(axis=1)
    np.testing.assert_allclose(stds, [0.02 / np.sqrt(2 * (i + 1)) for i in range(3)], rtol=0.03)


def test_lavis_vit_import_export_with_scan_layers():
    cfg = EvaViTConfig.preset("tiny", depth=3)
    images = jnp.zeros((1, 28, 28, 3), jnp.float32)
    params = jax.device_get(jax.jit(lambda r: nn.meta.unbox(EvaViT(cfg).init(r, images)["params"]))(
        jax.random.key(2)))
    sd = lavis.eva_vit_state_dict_from_params(params, cfg, "visual_encoder.")
    stacked, report = lavis.eva_vit_params_from_state_dict(sd, dataclasses.replace(cfg, scan_layers=True),
                                                           "visual_encoder.")
    assert not report.unmatched and stacked["blocks"]["fc1"]["kernel"].shape == (3, 64, 256)
    expected = stack_layers(params, "blocks")
    assert jax.tree.structure(stacked) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    back = lavis.eva_vit_state_dict_from_params(stacked, cfg, "visual_encoder.")
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
