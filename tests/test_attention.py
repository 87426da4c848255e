"""`models.common.attention`: both implementations against a plain reference (kv heads repeated,
softmax over the masked logits), values and gradients, with grouped heads, fully masked rows,
a probability multiplier (dropout's keep mask) and a logit scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vllama_jax.models.common import attention


def reference(q, k, v, mask, multiplier, scale):
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    full = jnp.broadcast_to(mask, logits.shape)
    probs = jnp.where(full, jax.nn.softmax(jnp.where(full, logits, -1e30), axis=-1), 0.0)
    if multiplier is not None:
        probs = probs * multiplier
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def inputs(heads, kv_heads, seed=0, b=2, lq=5, s=7, d=8):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, lq, heads, d)), jnp.float32)
    k = jnp.asarray(r.normal(size=(b, s, kv_heads, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(b, s, kv_heads, d)), jnp.float32)
    mask = jnp.asarray(r.random((b, 1, lq, s)) < 0.7).at[1, 0, 2].set(False)   # one fully masked row
    keep = jnp.asarray((r.random((b, heads, lq, s)) < 0.8) / 0.8, jnp.float32)
    return q, k, v, mask, keep


@pytest.mark.parametrize("implementation", ["batched", "einsum"])
@pytest.mark.parametrize("heads,kv_heads,with_multiplier", [(4, 4, True), (4, 2, False), (6, 1, True)])
def test_matches_reference_values_and_gradients(implementation, heads, kv_heads, with_multiplier):
    q, k, v, mask, keep = inputs(heads, kv_heads)
    keep = keep if with_multiplier else None
    ours = lambda q, k, v: attention(q, k, v, mask, scale=0.3, probs_multiplier=keep,  # noqa: E731
                                     implementation=implementation)
    ref = lambda q, k, v: reference(q, k, v, mask, keep, 0.3)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
    assert not np.any(np.asarray(ours(q, k, v))[1, 2])        # the fully masked row is zeros
    # A loss that weights every output differently, so each gradient entry is checked.
    w = jnp.asarray(np.random.default_rng(1).normal(size=ours(q, k, v).shape), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.tanh(f(q, k, v)) * w)  # noqa: E731
    got = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_no_mask_and_low_precision_dtypes_agree():
    q, k, v, _, _ = inputs(4, 2)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    outs = [attention(q16, k16, v16, dtype=jnp.bfloat16, implementation=i) for i in ("batched", "einsum")]
    assert all(o.dtype == jnp.bfloat16 for o in outs)
    np.testing.assert_allclose(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32), atol=2e-2)
    grads = [jax.grad(lambda q: jnp.sum(attention(q, k16, v16, dtype=jnp.bfloat16, implementation=i)
                                        .astype(jnp.float32)))(q16) for i in ("batched", "einsum")]
    assert grads[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grads[0], np.float32), np.asarray(grads[1], np.float32), atol=5e-2)


def test_bad_shapes_and_implementation_are_named():
    q, k, v, _, _ = inputs(4, 3)
    with pytest.raises(ValueError, match="KV dividing H"):
        attention(q, k, v)
    q, k, v, _, _ = inputs(4, 2)
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, implementation="flash")
