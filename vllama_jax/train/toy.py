"""A toy task for the training machinery: a frozen "tower" feeding a trainable "head".

Shaped like Video-LLaMA's situation at miniature size: a large pretrained-looking encoder that
stays frozen and a small module on top that learns. Tokens go through an embedding and residual
MLP blocks (`tower/...`), then a LayerNorm-MLP-dropout-Dense head (`head/...`) predicts a label
per token, `label = (7 * token + 3) % vocab`, which a linear read-out of the random tower
features can learn. Used by the tests, the `configs/toy.py` demo run and the FLOPs report.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax.models.common import Dense, LayerNorm, Preset, constrain, param


@dataclasses.dataclass(frozen=True)
class ToyConfig(Preset):
    vocab: int = 32
    embed: int = 32
    mlp: int = 64
    tower_layers: int = 2
    head_mlp: int = 64
    dropout: float = 0.1
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def presets(cls):
        return PRESETS


PRESETS = {
    "tiny": ToyConfig(),
    # A tower ~100x the head's FLOPs, for the frozen-vs-trainable cost comparison.
    "big_tower": ToyConfig(vocab=32, embed=256, mlp=1024, tower_layers=4, head_mlp=32),
}


class MlpBlock(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = LayerNorm(axis="embed", dtype=c.dtype, param_dtype=c.param_dtype)(x)
        h = Dense(c.mlp, ("embed", "mlp"), dtype=c.dtype, param_dtype=c.param_dtype)(h)
        h = Dense(c.embed, ("mlp", "embed"), dtype=c.dtype, param_dtype=c.param_dtype)(nn.gelu(h))
        return constrain(x + h, ("batch", "length", "embed"))


class Tower(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.config
        table = param(self, "embedding", nn.initializers.normal(1.0), (c.vocab, c.embed),
                      ("vocab", "embed"), c.param_dtype)
        # A one-hot matmul rather than a gather: the vocab is tiny and SPMD partitions a dot of
        # a (vocab, embed)-sharded table without the replication a sharded gather needs.
        onehot = jax.nn.one_hot(tokens, c.vocab, dtype=c.dtype)
        x = constrain(onehot @ table.astype(c.dtype), ("batch", "length", "embed"))
        block = nn.remat(MlpBlock) if c.remat else MlpBlock
        for i in range(c.tower_layers):
            x = block(c, name=f"block_{i}")(x)
        return x


class Head(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c = self.config
        h = LayerNorm(axis="embed", dtype=c.dtype, param_dtype=c.param_dtype)(x)
        h = nn.gelu(Dense(c.head_mlp, ("embed", "mlp"), dtype=c.dtype, param_dtype=c.param_dtype)(h))
        h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
        return Dense(c.vocab, ("mlp", "vocab"), dtype=c.dtype, param_dtype=c.param_dtype)(h)


class ToyModel(nn.Module):
    config: ToyConfig

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True):
        x = Tower(self.config, name="tower")(tokens)
        return Head(self.config, name="head")(x, deterministic)


def labels_for(tokens: np.ndarray, vocab: int) -> np.ndarray:
    return (7 * tokens + 3) % vocab


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """`Task` for ToyModel: next-label cross-entropy over all tokens."""
    config: ToyConfig
    seq_len: int = 8

    @property
    def model(self) -> ToyModel:
        return ToyModel(self.config)

    def _dummy(self):
        return jnp.zeros((1, self.seq_len), jnp.int32)

    def abstract_params(self):
        return jax.eval_shape(self.model.init, jax.random.PRNGKey(0), self._dummy())["params"]

    def init_params(self, rng):
        return nn.meta.unbox(self.model.init(rng, self._dummy())["params"])

    def loss_fn(self, params, batch, rng, deterministic):
        tokens, labels = batch["tokens"], batch["labels"]
        if tokens.ndim != 2 or tokens.shape != labels.shape:
            raise ValueError(f"toy batch wants tokens and labels [batch, length], got "
                             f"{tokens.shape} and {labels.shape}")
        logits = self.model.apply({"params": params}, tokens, deterministic=deterministic,
                                  rngs={"dropout": rng})
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return jnp.mean(nll), {"accuracy": accuracy,
                               "num_tokens": jnp.asarray(tokens.size, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Data: a grain pipeline, so its iterator state goes through grain's checkpoint handler.


def _example(index: int, seed: int, seq_len: int, vocab: int) -> dict:
    tokens = np.random.default_rng([seed, int(index)]).integers(0, vocab, seq_len, dtype=np.int32)
    return {"tokens": tokens, "labels": labels_for(tokens, vocab).astype(np.int32)}


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows of each global batch that one process feeds: contiguous, in process order (the
    rows its devices hold under `sharding.make_mesh`'s device order, which puts each process'
    devices together along the batch axes)."""
    if global_batch % process_count:
        raise ValueError(f"config.train.batch_size {global_batch} is not divisible by "
                         f"{process_count} processes")
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


def toy_dataset(*, batch_size: int, seq_len: int, vocab: int, seed: int = 0,
                num_examples: int = 4096, repeat: bool = True, rows: slice | None = None):
    """A grain IterDataset of toy batches of `batch_size` examples (the global batch).

    `rows` keeps only those rows of each global batch: the shuffle and batching run over example
    indices (cheap), and only this process' examples are made. The iterator's state is the global
    batch position, the same on every process and for every process count.
    """
    ds = grain.MapDataset.range(num_examples).shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.batch(batch_size, drop_remainder=True)
    if rows is not None:
        ds = ds.map(lambda idx: idx[rows])
    ds = ds.map(lambda idx: _stack([_example(i, seed, seq_len, vocab) for i in idx]))
    return ds.to_iter_dataset()


def _stack(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class GlobalPositionIterator:
    """A toy dataset iterator flagged `state_is_global`: its state (the global batch position)
    restores onto any process count (`vllama_jax.checkpoint`)."""
    state_is_global = True

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


class SlowIterator:
    """Sleeps `delay_s` in every `next()` (in the caller's thread, so grain's prefetching cannot
    hide it): keeps a toy run alive long enough to be killed or preempted in tests."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s
        self.state_is_global = getattr(inner, "state_is_global", False)

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay_s)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def build_task(config) -> ToyTask:
    m = config.model
    toy = ToyConfig.preset(m.preset, dropout=float(m.get("dropout", 0.1)),
                           remat=bool(m.get("remat", False)),
                           dtype=jnp.dtype(config.train.compute_dtype))
    return ToyTask(toy, seq_len=int(config.data.seq_len))


def _process_iter(config, *, seed: int, **kw):
    """This process' rows of the toy data (every process its own examples; together they are the
    global batch a single process would read)."""
    d, t = config.data, config.train
    vocab = ToyConfig.preset(config.model.preset).vocab
    rows = process_rows(int(t.batch_size), jax.process_index(), jax.process_count())
    return GlobalPositionIterator(iter(toy_dataset(batch_size=int(t.batch_size), seq_len=int(d.seq_len),
                                                   vocab=vocab, seed=seed, rows=rows, **kw)))


def build_train_iter(config):
    it = _process_iter(config, seed=int(config.train.seed))
    delay = float(config.data.get("delay_s", 0.0))
    return SlowIterator(it, delay) if delay > 0 else it


def build_eval_iter(config):
    return _process_iter(config, seed=int(config.train.seed) + 1,
                         num_examples=int(config.data.get("eval_examples", 64)), repeat=False)
