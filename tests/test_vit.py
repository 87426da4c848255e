import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from vllama_jax import sharding
from vllama_jax.convert.lavis import eva_vit_params_from_state_dict
from vllama_jax.models.vit import EvaViT, EvaViTConfig, bicubic_matrix, interpolate_pos_embed

import lavis_reference as ref

torch = ref.torch
TINY = EvaViTConfig.preset("tiny")


def _params_from_torch(model, config):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params, report = eva_vit_params_from_state_dict(sd, config)
    assert not report.unmatched and not report.ignored
    return params


def _apply(config, params, images):
    return jax.jit(EvaViT(config).apply)({"params": params}, jnp.asarray(images))


def _images(rng, n, size):
    return rng.normal(size=(n, size, size, 3)).astype(np.float32)


def test_presets():
    g = EvaViTConfig.preset("eva_vit_g")
    assert (g.patch_size, g.width, g.depth, g.num_heads, g.mlp_dim, g.layer_norm_eps) == (14, 1408, 39, 16, 6144, 1e-6)
    assert g.num_patches == 256
    with pytest.raises(ValueError, match="unknown EvaViTConfig preset"):
        EvaViTConfig.preset("vit_h")


def test_parity_with_lavis_eva_vit(rng):
    torch_model = ref.eva_vit(TINY)
    params = _params_from_torch(torch_model, TINY)
    images = _images(rng, 2, 28)
    out = _apply(TINY, params, images)
    assert out.shape == (2, 1 + 4, 64)
    expected = ref.run_eva_vit(torch_model, images)
    assert np.abs(expected).max() > 0.5  # a non-trivial output
    assert_close(out, expected, atol=1e-4, what="EVA ViT vs LAVIS")


def test_interpolate_matches_torch_bicubic(rng):
    for old, new in [(2, 3), (16, 7), (4, 9), (3, (5, 2))]:
        grid = new if isinstance(new, tuple) else (new, new)
        pos = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
        ours = interpolate_pos_embed(pos, grid)
        tokens = torch.from_numpy(pos[:, 1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
        theirs = torch.nn.functional.interpolate(tokens, size=grid, mode="bicubic", align_corners=False)
        theirs = torch.cat([torch.from_numpy(pos[:, :1]), theirs.permute(0, 2, 3, 1).flatten(1, 2)], 1).numpy()
        assert_close(ours, theirs, atol=1e-5, what=f"bicubic {old}->{grid}")
        assert_close(interpolate_pos_embed(jnp.asarray(pos), grid), theirs, atol=1e-5, what="jax path")
    np.testing.assert_allclose(bicubic_matrix(5, 5), np.eye(5), atol=1e-7)


def test_pos_embed_interpolation_matches_lavis(rng):
    """A 28-px checkpoint run at 42 px: LAVIS resamples at load time, we at load time or on the fly."""
    mod = ref.eva_vit_module()
    small = ref.eva_vit(TINY)
    big = ref.eva_vit(TINY, seed=1, img_size=42)
    sd = dict(small.state_dict())
    mod.interpolate_pos_embed(big, sd)
    big.load_state_dict(sd)
    images = _images(rng, 2, 42)
    expected = ref.run_eva_vit(big, images)

    on_the_fly = _apply(TINY, _params_from_torch(small, TINY), images)
    assert_close(on_the_fly, expected, atol=1e-4, what="runtime pos-embed interpolation")

    big_cfg = EvaViTConfig.preset("tiny", img_size=42)
    torch_sd = {k: v.detach().numpy() for k, v in small.state_dict().items()}
    params, report = eva_vit_params_from_state_dict(torch_sd, big_cfg)
    assert any("pos_embed" in n for n in report.notes)
    at_load = _apply(big_cfg, params, images)
    assert_close(at_load, expected, atol=1e-4, what="load-time pos-embed interpolation")


def test_bf16_forward_close_to_fp32(rng):
    torch_model = ref.eva_vit(TINY)
    params = _params_from_torch(torch_model, TINY)
    images = jnp.asarray(_images(rng, 2, 28))
    fp32 = _apply(TINY, params, images)
    bf16_cfg = EvaViTConfig.preset("tiny", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bf16_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    out = _apply(bf16_cfg, bf16_params, images)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - fp32)))
    assert err < 0.05 * float(jnp.max(jnp.abs(fp32))), err


def test_remat_same_output(rng):
    images = jnp.asarray(_images(rng, 1, 28))
    cfg = EvaViTConfig.preset("tiny", depth=1)
    remat_cfg = EvaViTConfig.preset("tiny", depth=1, remat=True)
    params = nn.meta.unbox(jax.jit(EvaViT(cfg).init)(jax.random.key(0), images))["params"]
    plain = _apply(cfg, params, images)
    remat = _apply(remat_cfg, params, images)
    grad = lambda c: jax.jit(jax.grad(lambda p: jnp.sum(EvaViT(c).apply({"params": p}, images) ** 2)))(params)
    for a, b in zip(jax.tree.leaves(grad(remat_cfg)), jax.tree.leaves(grad(cfg))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), atol=1e-6)


def test_logical_axes_and_sharded_forward(rng):
    images = jnp.asarray(_images(rng, 8, 28))
    boxed = jax.eval_shape(EvaViT(TINY).init, jax.random.key(0), images)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    assert all(len(set(n for n in x.names if n)) == len([n for n in x.names if n]) for x in leaves)
    variables = nn.meta.unbox(jax.jit(EvaViT(TINY).init)(jax.random.key(0), images))
    expected = jax.jit(EvaViT(TINY).apply)(variables, images)
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.param_shardings(boxed, mesh)
    assert shardings["params"]["blocks_0"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    fn = jax.jit(sharding.with_rules(EvaViT(TINY).apply))
    out = fn(jax.device_put(variables, shardings), sharding.shard_batch(np.asarray(images), mesh))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("shape, match", [
    ((1, 28, 28, 1), "expected 3 channels"),
    ((1, 3, 28, 28), "expected 3 channels"),
    ((1, 30, 28, 3), "multiples of the patch size 14"),
    ((28, 28, 3), r"expected \[N, H, W, 3\]"),
])
def test_bad_images_raise(shape, match):
    with pytest.raises(ValueError, match=match):
        EvaViT(TINY).init(jax.random.key(0), jnp.zeros(shape))
