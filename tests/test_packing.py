"""Packed rows (several examples per row) and the chunked loss give the unpacked, full-logits
model's logits, loss and gradients."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from data_pipelines import packing
from vllama_jax.models.common import attention
from vllama_jax.models.llama import positions_from_segments
from vllama_jax.models.video_llama import (VideoLlama, VideoLlamaConfig, causal_lm_loss, chunked_causal_lm_loss,
                                           init_params)

CFG = VideoLlamaConfig.preset("tiny")
T, L = 3, 64
LENGTHS = (20, 30, 16, 40)   # four examples; first fit packs two per row into B=2 rows of L=64
K = CFG.num_video_tokens


@functools.lru_cache(maxsize=None)
def _params():
    return jax.jit(lambda r: init_params(CFG, r))(jax.random.key(0))["params"]


def _examples(seed=0):
    """Loader-style padded rows: bos, K media tokens, text; targets on the text after the media."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in LENGTHS:
        ids = np.zeros(L, np.int32)
        ids[:n] = rng.integers(3, CFG.llama.vocab_size, n)
        ids[0] = 1
        media = np.zeros(L, bool)
        media[1:1 + K] = True
        ids[media] = 0
        targets = np.full(L, -100, np.int32)
        targets[1 + K + 2:n] = ids[1 + K + 2:n]
        attention_mask = (np.arange(L) < n).astype(np.int32)
        frame_mask = np.ones(T, bool)
        frame_mask[rng.integers(1, T + 1):] = False
        frames = rng.normal(size=(T, 28, 28, 3)).astype(np.float32) * frame_mask[:, None, None, None]
        rows.append({"input_ids": ids, "attention_mask": attention_mask, "targets": targets, "media_mask": media,
                     "frames": frames, "frame_mask": frame_mask})
    return rows


def _unpacked(rows):
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _packed(rows, groups=1):
    layout = packing.Layout(2, L, 4, groups)
    placed = packing.assign_rows([packing.example_length(r) for r in rows], layout)
    assert placed == [0, 0, 1, 1]
    return {k: jnp.asarray(v) for k, v in packing.pack_batch(rows, placed, layout, pad_id=0).items()}


def _loss_and_grads(config, batch):
    def loss(p):
        return VideoLlama(config).apply({"params": p}, batch, ("video",), True, method=VideoLlama.loss)
    (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(_params())
    return value, aux, grads


def _assert_trees_close(a, b, atol, what):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert_close(x, y, atol=atol, rtol=1e-4, what=f"{what} {jax.tree_util.keystr(path)}")


def test_pack_batch_layout():
    rows = _examples()
    batch = _packed(rows)
    np.testing.assert_array_equal(batch["example_mask"], [True] * 4)
    seg = np.asarray(batch["segment_ids"])
    assert (seg[0, :20] == 1).all() and (seg[0, 20:50] == 2).all() and (seg[0, 50:] == 0).all()
    np.testing.assert_array_equal(np.asarray(batch["input_ids"])[0, 20:50], rows[1]["input_ids"][:30])
    np.testing.assert_array_equal(np.asarray(batch["frames"])[3], rows[3]["frames"])   # row-major slots
    assert np.asarray(batch["media_mask"]).sum() == 4 * K
    pos = np.asarray(positions_from_segments(batch["segment_ids"]))
    np.testing.assert_array_equal(pos[0, :50], np.r_[np.arange(20), np.arange(30)])
    # An example that fits no row closes the batch; so does one that finds no free media slot.
    assert packing.assign_rows([60, 60, 10], packing.Layout(2, 64, 8)) == [0, 1]
    assert packing.assign_rows([10, 10, 10], packing.Layout(2, 64, 2)) == [0, 0]
    with pytest.raises(ValueError, match="cannot fit"):
        packing.assign_rows([65], packing.Layout(2, 64, 4))
    # Two micro-batches: rows 0 / 1 and slots 0, 2 / 1, 3 are theirs.
    two = packing.Layout(2, 64, 4, groups=2)
    rows = packing.assign_rows([10] * 5, two)
    assert rows == [0, 0, 1, 1] and packing.assign_slots(rows, 2) == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="divisible by 2"):
        packing.Layout(2, 64, 3, groups=2)


def test_each_micro_batch_of_a_grouped_packed_batch_is_its_rows_examples():
    """With groups = accum_steps the trainer's micro-batch split (every n-th row and slot) gives
    packed micro-batches whose loss is their own examples' unpacked loss."""
    from vllama_jax.train.step import split_microbatches

    rows = _examples(2)
    micro = split_microbatches(_packed(rows, groups=2), 2)
    for m, mine in enumerate((rows[:2], rows[2:])):
        part = jax.tree.map(lambda x: x[m], micro)
        assert part["example_mask"].shape == (2,) and bool(part["example_mask"].all())
        loss_p, aux_p, _ = _loss_and_grads(CFG, part)
        loss_u, aux_u, _ = _loss_and_grads(CFG, _unpacked(mine))
        assert int(aux_p["num_tokens"]) == int(aux_u["num_tokens"])
        assert_close(loss_p, loss_u, atol=1e-5, what=f"micro-batch {m} loss")


def test_segment_ids_keep_attention_inside_each_segment():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 4, 8)), jnp.float32) for _ in range(3))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    for impl in ("batched", "einsum"):
        out = attention(q, k, v, segment_ids=(seg, seg), implementation=impl)
        first = attention(q[:, :3], k[:, :3], v[:, :3], implementation=impl)
        second = attention(q[:, 3:5], k[:, 3:5], v[:, 3:5], implementation=impl)
        assert_close(out[:, :3], first, atol=1e-6, what=impl)
        assert_close(out[:, 3:5], second, atol=1e-6, what=impl)


def test_packed_logits_loss_and_grads_equal_unpacked():
    rows = _examples()
    unpacked, packed = _unpacked(rows), _packed(rows)
    fwd = jax.jit(lambda p, b: VideoLlama(CFG).apply({"params": p}, b, ("video",)).logits)
    lu, lp = np.asarray(fwd(_params(), unpacked)), np.asarray(fwd(_params(), packed))
    starts = {0: (0, 0), 1: (0, 20), 2: (1, 0), 3: (1, 16)}
    for i, n in enumerate(LENGTHS):
        r, s = starts[i]
        assert_close(lp[r, s:s + n], lu[i, :n], atol=1e-4, what=f"example {i} logits")
    loss_u, aux_u, grads_u = _loss_and_grads(CFG, unpacked)
    loss_p, aux_p, grads_p = _loss_and_grads(CFG, packed)
    assert int(aux_u["num_tokens"]) == int(aux_p["num_tokens"]) > 0
    assert_close(loss_p, loss_u, atol=1e-5, what="loss")
    _assert_trees_close(grads_p, grads_u, 1e-5, "grad")


def test_chunked_loss_equals_full_logits_loss_and_grads():
    rows = _examples(1)
    for batch in (_unpacked(rows), _packed(rows)):
        loss_f, aux_f, grads_f = _loss_and_grads(CFG, batch)
        for chunk in (16, 7):   # 63 shifted positions: a divisor-free chunk pads the last one
            loss_c, aux_c, grads_c = _loss_and_grads(dataclasses.replace(CFG, loss_chunk=chunk), batch)
            assert int(aux_c["num_tokens"]) == int(aux_f["num_tokens"])
            assert_close(loss_c, loss_f, atol=1e-5, what=f"loss chunk {chunk}")
            _assert_trees_close(grads_c, grads_f, 1e-5, f"grad chunk {chunk}")


def test_chunked_loss_function_with_a_tied_head():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 9)), jnp.int32).at[0, :3].set(-100)

    def full(h, w):
        return causal_lm_loss(h @ w, targets)[0]

    for size in (3, 100):   # 8 shifted positions: chunks of 3 (last one padded), one chunk of 8
        def chunked(h, w):
            return chunked_causal_lm_loss(h, w, targets, size)[0]

        assert_close(chunked(hidden, kernel), full(hidden, kernel), atol=1e-5, what="loss")
        for a, b in zip(jax.grad(chunked, (0, 1))(hidden, kernel), jax.grad(full, (0, 1))(hidden, kernel)):
            assert_close(a, b, atol=1e-5, what="grad")


def test_chunked_loss_never_holds_full_logits():
    """The compiled full loss+grad holds [B, L, vocab] logits; the chunked one a few [B, chunk,
    vocab] buffers at most (measured: 2.4 MB vs 25 MB here)."""
    b, length, d, vocab, chunk = 2, 256, 16, 4096, 32
    hidden = jax.ShapeDtypeStruct((b, length, d), jnp.float32)
    kernel = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((b, length), jnp.int32)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h, w, y: fn(h, w, y)[0], (0, 1)))
        return grad.lower(hidden, kernel, targets).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(lambda h, w, y: causal_lm_loss(h @ w, y))
    chunked = temp_bytes(lambda h, w, y: chunked_causal_lm_loss(h, w, y, chunk))
    logits_bytes = b * (length - 1) * vocab * 4
    assert full >= logits_bytes
    assert chunked <= 3 * b * chunk * vocab * 4 < logits_bytes, (full, chunked)


@pytest.mark.parametrize("scan_layers,tied", [(True, True), (False, False)])
def test_llama_segments_equal_separate_rows_and_head_kernel(scan_layers, tied):
    """Two sequences packed in one row (scanned + remat'd layers, or unrolled) give each one's
    logits alone; `head_kernel` is the projection `head` applies (tied or not)."""
    from vllama_jax.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig.preset("tiny", scan_layers=scan_layers, remat=scan_layers, tie_word_embeddings=tied)
    model = Llama(cfg)
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, cfg.vocab_size, (1, 7)), rng.integers(3, cfg.vocab_size, (1, 5))
    packed = jnp.asarray(np.concatenate([a, b, np.zeros((1, 4), int)], axis=1), jnp.int32)
    seg = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 4])
    params = model.init(jax.random.key(0), packed)
    out = model.apply(params, packed, attention_mask=(seg > 0).astype(jnp.int32), segment_ids=seg,
                      return_hidden=True)
    alone = [model.apply(params, jnp.asarray(x, jnp.int32)).logits for x in (a, b)]
    assert_close(out.logits[:, :7], alone[0], atol=1e-4, what="first segment")
    assert_close(out.logits[:, 7:12], alone[1], atol=1e-4, what="second segment")
    kernel = model.apply(params, method=Llama.head_kernel)
    assert_close(out.hidden_states @ kernel, out.logits, atol=1e-4, what="head_kernel")
