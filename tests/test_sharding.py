import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from vllama_jax import sharding
from vllama_jax.models.common import Dense, LayerNorm


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Dense(64, ("embed", "mlp"))(x)
        x = LayerNorm(axis="mlp")(x)
        return Dense(32, ("mlp", "embed"))(x)


def test_make_mesh_auto_axes_and_inference():
    mesh = sharding.make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh((3, 2, 1))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 1))


def test_rules_weights_fsdp_tensor_and_activations_batch_only():
    assert sharding.logical_to_mesh_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("vocab", "embed")) == P("tensor", "fsdp")
    # embed on an activation gives way to batch, which already took fsdp.
    assert sharding.logical_to_mesh_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)


def test_sharded_forward_equals_single_device():
    model = _Mlp()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 32)), jnp.float32)
    variables = nn.meta.unbox(model.init(jax.random.key(0), x))
    expected = model.apply(variables, x)
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.param_shardings(jax.eval_shape(model.init, jax.random.key(0), x), mesh)
    assert shardings["params"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
    sharded = jax.device_put(variables, shardings)
    out = jax.jit(model.apply)(sharded, sharding.shard_batch(x, mesh))
    assert out.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_jit_with_rules_binds_constraints_only_on_a_mesh():
    """The one jit-on-a-mesh helper: inside use_mesh the models' logical constraints become real
    shardings (mlp -> tensor); with no mesh the same function runs unsharded; MeshJit does both."""
    from vllama_jax.models.common import constrain

    def fn(x, *, axes):
        return constrain(x * 2, axes)

    x = jnp.ones((4, 8))
    mesh = sharding.make_mesh((2, 2, 2))
    jitted = sharding.jit_with_rules(fn, static_argnames=("axes",))
    with sharding.use_mesh(mesh):
        out = jitted(x, axes=(None, "mlp"))
    assert out.sharding.spec == P(None, "tensor")
    with sharding.use_mesh(None):
        np.testing.assert_array_equal(jitted(x, axes=(None, "mlp")), 2 * np.ones((4, 8)))
    mesh_jit = sharding.MeshJit(lambda y: constrain(y + 1, ("batch", None)), mesh)
    assert mesh_jit(x).sharding.spec == P(("data", "fsdp"))
    assert "sharding" in mesh_jit.lower(x).as_text()
