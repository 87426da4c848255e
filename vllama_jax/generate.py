"""Batched text generation over the LLaMA KV cache, one `jax.jit` with fixed shapes.

    prompt [B, L] (ids, or inputs_embeds with soft tokens already spliced; left- or right-padded)
      -> prefill: one forward writes all L slots of the cache; the logits of each row's last
         real token pick its first new token
      -> decode: `jax.lax.while_loop` feeds one token per step until every row is done or
         `max_new_tokens` are out

Both paddings work because the cache masks pad slots and a token's RoPE position counts only the
real tokens before it (see `models/llama.py`); a right-padded row simply has masked slots between
its prompt and its first new token.

Token choice follows HF `generate`: repetition penalty (HF semantics: for tokens seen in the
prompt ids or already generated, positive logits are divided by the penalty and negative ones
multiplied), then temperature, top-k, top-p, then a categorical sample; greedy is the argmax
after the penalty. A row stops on an eos id or when its generated text ends a stop string; from
then on it emits `pad_token_id` and its count stops.

Beam search (`num_beams` > 1) is HF's `_beam_search` step for step (see `_beam_advance`): the
cache holds B * num_beams rows (a row's prefill copied to its beams) and is gathered by the
chosen beams' sources every step; stop strings and the repetition penalty's seen-set follow the
beams the same way. Both decoders are a `_start` (prefill + first choice) and a `_step` over a
state dict: `generate` runs them in one jit with a `while_loop`, `stream` drives the same two
functions from Python and yields after every step (for showing answers as they come).

Stop strings are matched on device with per-token tables (`StopTables`), no host round trip:
for each stop string s, a row keeps the set of lengths r (0 < r < len(s)) for which its text so
far ends with s[:r]. A token with text t stops the row if t contains s, or if t starts with
s[r:] for a pending r; its own suffixes start new pending lengths, and a token that is entirely
an inner piece s[r:r+len(t)] extends r. So "###" is found whether the model writes "###", "##"+"#"
or "#"+"#"+"#". Token texts come from the tokenizer as it decodes them mid-text (`token_texts`).
Matching covers the generated text only (not the prompt), like the reference's stopping criterion.

Sharded: pass `mesh`; params keep the shardings they were placed with
(`sharding.param_shardings`), the cache is constrained to `llama.cache_shardings` and the model's
activation constraints bind through `sharding.LOGICAL_RULES`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vllama_jax import sharding
from vllama_jax.models.llama import Llama, LlamaConfig, cache_shardings, init_cache

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = 0, 1, 2
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_EOS: "eos", FINISH_STOP: "stop_string"}
# Stands in for token texts that are unknown or not valid text on their own, so they match nothing.
_OPAQUE = "\ufffd"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens and when to stop. Hashable: it is a static argument of the jit.

    top_k=0 and top_p=1.0 switch those filters off (HF's `generate` defaults top_k to 50 when
    sampling; set it explicitly to match). eos_token_ids stop a row on that token; stop_strings
    stop it when its generated text ends one of them (needs the tokenizer's token texts).
    num_beams > 1: beam search (beam sampling with do_sample), HF semantics; a finished
    hypothesis scores sum(log p) / new_tokens ** length_penalty; early_stopping True stops a row
    once it holds num_beams finished hypotheses, False when the heuristic says no running beam can
    beat them, "never" when no beam can (HF's three settings).
    """
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    pad_token_id: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        ids = self.eos_token_ids
        ids = () if ids is None else (ids,) if isinstance(ids, (int, np.integer)) else ids
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in ids))
        stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else self.stop_strings
        object.__setattr__(self, "stop_strings", tuple(stops or ()))
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"GenerationConfig.temperature must be > 0, got {self.temperature}")
        if int(self.top_k) < 0:
            raise ValueError(f"GenerationConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"GenerationConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if int(self.num_beams) < 1:
            raise ValueError(f"GenerationConfig.num_beams must be >= 1, got {self.num_beams}")
        object.__setattr__(self, "num_beams", int(self.num_beams))
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"GenerationConfig.early_stopping must be True, False or 'never', got "
                             f"{self.early_stopping!r}")
        if self.early_stopping != "never":   # 1 / 0 read as True / False (the decoder tests `is True`)
            object.__setattr__(self, "early_stopping", bool(self.early_stopping))
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"GenerationConfig.stop_strings must be non-empty strings, got {self.stop_strings!r}")

    def replace(self, **overrides) -> "GenerationConfig":
        return dataclasses.replace(self, **overrides)


@flax.struct.dataclass
class GenerationOutput:
    tokens: jax.Array         # [B, max_new_tokens] int32; pad_token_id after a row stopped
    num_tokens: jax.Array     # [B] int32 generated tokens, the eos / stop-string token included
    finish_reason: jax.Array  # [B] int32: FINISH_LENGTH, FINISH_EOS or FINISH_STOP
    scores: jax.Array | None = None   # [B] float32 beam score of the returned hypothesis (beam search only)

    def rows(self) -> list[list[int]]:
        """Each row's generated ids (host lists), cut at its count."""
        tokens, num = np.asarray(self.tokens), np.asarray(self.num_tokens)
        return [tokens[i, :num[i]].tolist() for i in range(tokens.shape[0])]


# ----------------------------------------------------------------------------------- stop strings

@flax.struct.dataclass
class StopTables:
    """Per-token match tables of S stop strings over a V-token vocab (R = longest stop string - 1).

    contains [S, V]     the token's text contains the whole stop string
    finishes [S, V, R]  the text starts with s[r:] (index r-1): completes a match pending at r
    starts   [S, V, R]  the text ends with s[:r]: leaves a match pending at r
    inner    [S, V, R]  the text equals s[r:r+len] with r+len < len(s): moves pending r to r+len
    length   [V]        the text's length (0: the token leaves pending matches as they are)
    """
    contains: jax.Array
    finishes: jax.Array
    starts: jax.Array
    inner: jax.Array
    length: jax.Array


def token_texts(tokenizer, vocab_size: int | None = None, prefix: str = "abc") -> list[str]:
    """The text each token id adds when it follows other text (HF's StopStringCriteria trick:
    decode `prefix` + the token and drop the prefix, so "▁x" reads " x" and byte pieces read as
    their character). Ids past the tokenizer, and pieces that are no text alone, read as U+FFFD."""
    n = len(tokenizer) if vocab_size is None else int(vocab_size)
    base = tokenizer.convert_ids_to_tokens(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    head = tokenizer.convert_tokens_to_string(base)
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))
    texts = []
    for piece in pieces:
        if piece is None:
            texts.append(_OPAQUE)
            continue
        full = tokenizer.convert_tokens_to_string(base + [piece])
        texts.append(full[len(head):] if full.startswith(head) else _OPAQUE)
    return texts + [_OPAQUE] * (n - len(texts))


def make_stop_tables(stop_strings: Sequence[str], texts: Sequence[str]) -> StopTables:
    """`StopTables` for `stop_strings` over a vocab whose token `i` reads `texts[i]`."""
    if not stop_strings:
        raise ValueError("make_stop_tables needs at least one stop string")
    v = len(texts)
    r_max = max(1, max(len(s) for s in stop_strings) - 1)
    contains = np.zeros((len(stop_strings), v), bool)
    finishes, starts, inner = (np.zeros((len(stop_strings), v, r_max), bool) for _ in range(3))
    length = np.asarray([len(t) for t in texts], np.int32)
    for k, s in enumerate(stop_strings):
        for i, t in enumerate(texts):
            if not t:
                continue
            contains[k, i] = s in t
            for r in range(1, len(s)):
                finishes[k, i, r - 1] = t.startswith(s[r:])
                starts[k, i, r - 1] = len(t) >= r and t.endswith(s[:r])
                inner[k, i, r - 1] = r + len(t) < len(s) and s[r:r + len(t)] == t
    return StopTables(*(jnp.asarray(a) for a in (contains, finishes, starts, inner, length)))


def stop_step(tables: StopTables, pending: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token per row: (stops [B] bool, new pending [B, S, R] bool)."""
    def row(p, tok):
        n = tables.length[tok]
        hit = tables.contains[:, tok] | jnp.any(p & tables.finishes[:, tok], axis=-1)
        carried = p & tables.inner[:, tok]
        src = jnp.arange(p.shape[-1]) - n
        shifted = jnp.where(src >= 0, jnp.take_along_axis(carried, jnp.maximum(src, 0)[None].repeat(p.shape[0], 0),
                                                         axis=-1), False)
        new = jnp.where(n == 0, p, tables.starts[:, tok] | shifted)
        return jnp.any(hit), new
    return jax.vmap(row)(pending, tokens)


def stop_tables_for(tokenizer, stop_strings: Sequence[str], vocab_size: int) -> StopTables:
    return make_stop_tables(stop_strings, token_texts(tokenizer, vocab_size))


# ------------------------------------------------------------------------------------ logits

def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF `RepetitionPenaltyLogitsProcessor` on `logits [B, V]` for the tokens marked in `seen [B, V]`."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def top_k_filter(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """HF `TopKLogitsWarper`: everything below the k-th largest logit becomes -inf (ties kept);
    k <= 0 keeps everything. `k` may be traced."""
    return _top_k_sorted(logits, jnp.sort(logits, axis=-1), k)[0]


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """HF `TopPLogitsWarper`: drop the least likely tokens whose total probability is <= 1 - p,
    always keeping the most likely one (equal logits at the cut are kept together)."""
    return _top_p_sorted(logits, jnp.sort(logits, axis=-1), p)


def _top_k_sorted(logits, ascending, k, min_keep=1):
    v = logits.shape[-1]
    k = jnp.clip(jnp.where(k > 0, jnp.maximum(k, min_keep), v), 1, v)
    kth = jax.lax.dynamic_index_in_dim(ascending, v - k, axis=-1, keepdims=True)
    return jnp.where(logits < kth, -jnp.inf, logits), jnp.where(ascending < kth, -jnp.inf, ascending)


def _top_p_sorted(logits, ascending, p, min_keep=1):
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop = (cum <= 1.0 - p).at[..., -min_keep:].set(False)
    threshold = jnp.min(jnp.where(drop, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


@flax.struct.dataclass
class _Knobs:
    """The sampling numbers, traced so a new temperature / top-k / top-p / penalty reuses the program."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    eos: jax.Array    # [E] int32 (-1 when none)
    pad: jax.Array
    length_penalty: jax.Array

    @classmethod
    def of(cls, gen: GenerationConfig) -> "_Knobs":
        return cls(jnp.float32(gen.temperature), jnp.int32(gen.top_k), jnp.float32(gen.top_p),
                   jnp.float32(gen.repetition_penalty), jnp.asarray(gen.eos_token_ids or (-1,), jnp.int32),
                   jnp.int32(gen.pad_token_id), jnp.float32(gen.length_penalty))


def select_tokens(logits: jax.Array, seen: jax.Array | None, gen: GenerationConfig, key: jax.Array,
                  knobs: _Knobs | None = None) -> jax.Array:
    """Next token per row from `logits [B, V]` (penalty, then greedy or temperature/top-k/top-p sampling)."""
    knobs = _Knobs.of(gen) if knobs is None else knobs
    logits = logits.astype(jnp.float32)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, knobs.repetition_penalty)
    if not gen.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, _warp(logits, knobs), axis=-1).astype(jnp.int32)


def _warp(logits: jax.Array, knobs: _Knobs, min_keep: int = 1) -> jax.Array:
    """HF's sampling warpers in their order: temperature, top-k, top-p (each keeping >= min_keep)."""
    logits = logits / knobs.temperature
    ascending = jnp.sort(logits, axis=-1)
    logits, ascending = _top_k_sorted(logits, ascending, knobs.top_k, min_keep)
    return _top_p_sorted(logits, ascending, knobs.top_p, min_keep)


# ------------------------------------------------------------------------------------ generation

@flax.struct.dataclass
class _Consts:
    """What every decode step reads besides params and state (all traced)."""
    rng: jax.Array
    tables: StopTables | None
    knobs: _Knobs


def _prepare(params, config, gen, input_ids, inputs_embeds, attention_mask, rng, stop_tables):
    """Checks the inputs; returns (traced args, the static GenerationConfig the program depends on)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate needs exactly one of input_ids [B, L] or inputs_embeds [B, L, hidden]")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if input_ids is not None and (np.ndim(input_ids) != 2 or not jnp.issubdtype(jnp.asarray(input_ids).dtype, jnp.integer)):
        raise ValueError(f"input_ids must be integer [batch, length], got {jnp.asarray(input_ids).dtype} "
                         f"{np.shape(input_ids)}")
    if inputs_embeds is not None and (np.ndim(inputs_embeds) != 3 or np.shape(inputs_embeds)[-1] != config.hidden_size):
        raise ValueError(f"inputs_embeds must be [batch, length, {config.hidden_size}], got {np.shape(inputs_embeds)}")
    b, length = np.shape(prompt)[:2]
    if attention_mask is None:
        attention_mask = jnp.ones((b, length), jnp.int32)
    if tuple(np.shape(attention_mask)) != (b, length):
        raise ValueError(f"attention_mask must be [batch, length] = {(b, length)}, got {tuple(np.shape(attention_mask))}")
    if not isinstance(attention_mask, jax.core.Tracer):
        empty = np.flatnonzero(np.asarray(attention_mask).sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"attention_mask rows {empty[:8].tolist()} have no real token; every prompt "
                             "row needs at least one")
    if gen.stop_strings and stop_tables is None:
        raise ValueError(f"stop_strings {gen.stop_strings!r} need stop_tables "
                         "(generate.stop_tables_for(tokenizer, stop_strings, vocab_size))")
    if stop_tables is not None and stop_tables.length.shape[0] != config.vocab_size:
        raise ValueError(f"stop_tables cover {stop_tables.length.shape[0]} tokens, the model has "
                         f"{config.vocab_size}")
    if gen.num_beams > 1 and gen.num_beams * max(2, 1 + len(gen.eos_token_ids)) > config.vocab_size:
        raise ValueError(f"num_beams={gen.num_beams} keeps {gen.num_beams * max(2, 1 + len(gen.eos_token_ids))} "
                         f"candidates per step, more than the vocab's {config.vocab_size} tokens")
    rng = jax.random.key(0) if rng is None else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    consts = _Consts(rng, stop_tables if gen.stop_strings else None, _Knobs.of(gen))
    # Only what changes the program is static; the numbers travel in `_Knobs`.
    static = GenerationConfig(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                              repetition_penalty=1.0 if gen.repetition_penalty == 1.0 else 2.0,
                              eos_token_ids=(0,) * len(gen.eos_token_ids), num_beams=gen.num_beams,
                              early_stopping=gen.early_stopping)
    return (params, input_ids, inputs_embeds, jnp.asarray(attention_mask, jnp.int32), consts), static


def _in_mesh(mesh, fn, *args, **kwargs):
    with sharding.use_mesh(mesh):
        return fn(*args, **kwargs, mesh=mesh)


def generate(params: Any, config: LlamaConfig, gen: GenerationConfig, *, input_ids: Any = None,
             inputs_embeds: Any = None, attention_mask: Any = None, rng: jax.Array | None = None,
             stop_tables: StopTables | None = None, mesh: jax.sharding.Mesh | None = None) -> GenerationOutput:
    """Generates up to `gen.max_new_tokens` tokens after each prompt row (one jit: prefill, then a
    `lax.while_loop` of decode steps).

    params: the LLaMA params (`{'embed_tokens': ..., 'layers_0': ...}`, not wrapped in 'params').
    input_ids [B, L] int or inputs_embeds [B, L, hidden] (exactly one); attention_mask [B, L] in
    {0, 1} (default all ones), each row with at least one real token; padding on either side.
    rng: a PRNG key for sampling (default key 0). stop_tables: required when gen.stop_strings is
    set (`stop_tables_for(tokenizer, gen.stop_strings, config.vocab_size)`). mesh: run sharded.
    With gen.num_beams > 1 each row returns its best beam-search hypothesis (and its score).
    """
    args, static = _prepare(params, config, gen, input_ids, inputs_embeds, attention_mask, rng, stop_tables)
    return _in_mesh(mesh, _generate, *args, config=config, gen=static)


def stream(params: Any, config: LlamaConfig, gen: GenerationConfig, *, input_ids: Any = None,
           inputs_embeds: Any = None, attention_mask: Any = None, rng: jax.Array | None = None,
           stop_tables: StopTables | None = None, mesh: jax.sharding.Mesh | None = None
           ) -> Iterator[GenerationOutput]:
    """`generate` one decode step at a time: yields the output so far after every step, the last
    yield being exactly what `generate` returns for the same arguments.

    The steps are the same functions `generate` loops over in its `while_loop`, each jitted on its
    own and driven from Python, so a caller can show tokens as they come. With beams, the
    intermediate yields hold the leading running hypothesis (earlier tokens may change).
    """
    args, static = _prepare(params, config, gen, input_ids, inputs_embeds, attention_mask, rng, stop_tables)
    params, consts = args[0], args[-1]
    state = _in_mesh(mesh, _start_jit, *args, config=config, gen=static)
    while bool(_running(state, static)):
        yield _preview_jit(state, gen=static)
        state = _in_mesh(mesh, _step_jit, params, consts, state, config=config, gen=static)
    yield _result_jit(state, gen=static)


@functools.partial(sharding.jit_with_rules, static_argnames=("config", "gen", "mesh"))
def _generate(params, input_ids, inputs_embeds, attention_mask, consts, *, config, gen, mesh):
    state = _start(params, input_ids, inputs_embeds, attention_mask, consts, config=config, gen=gen, mesh=mesh)
    state = jax.lax.while_loop(lambda s: _running(s, gen),
                               lambda s: _step(params, consts, s, config=config, gen=gen, mesh=mesh), state)
    return _result(state, gen)


def _start(params, input_ids, inputs_embeds, attention_mask, consts, *, config, gen, mesh):
    """Prefill, then the first token choice: the decode state (traced with the logical rules)."""
    model = Llama(config)
    variables = {"params": params}
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, length = prompt.shape[:2]
    n_new, k = gen.max_new_tokens, gen.num_beams
    # The last new token is never fed back, so prompt + n_new - 1 slots suffice; one spare keeps n_new=1 legal.
    cache = _constrain(init_cache(config, b, length + n_new), mesh)
    out = model.apply(variables, input_ids, attention_mask, inputs_embeds=inputs_embeds, cache=cache,
                      return_hidden=True, return_logits=False)
    last = length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
    hidden = jnp.take_along_axis(out.hidden_states, last[:, None, None], axis=1)
    logits = model.apply(variables, hidden, method=Llama.head)[:, 0]

    seen = None
    if gen.repetition_penalty != 1.0:
        seen = jnp.zeros((b, config.vocab_size), bool)
        if input_ids is not None:
            rows = jnp.broadcast_to(jnp.arange(b)[:, None], input_ids.shape)
            ids = jnp.clip(input_ids, 0, config.vocab_size - 1)
            seen = jnp.zeros((b, config.vocab_size), jnp.int32).at[rows, ids].max(attention_mask) > 0
    tables = consts.tables
    pending = jnp.zeros((b, 1 if tables is None else tables.contains.shape[0],
                         1 if tables is None else tables.finishes.shape[-1]), bool)
    pad = consts.knobs.pad
    if k == 1:
        zeros = jnp.zeros((b,), jnp.int32)
        state = dict(t=jnp.int32(0), tokens=jnp.full((b, n_new), pad, jnp.int32), done=jnp.zeros((b,), bool),
                     num=zeros, reason=zeros, seen=seen, pending=pending, cache=out.cache, last=zeros)
        return _greedy_advance(state, logits, consts, gen)
    # Beam search: the K beams of a row share its prefill, so its cache rows are copied K times.
    rows = jnp.repeat(jnp.arange(b), k)
    expand = lambda x: None if x is None else jnp.take(x, rows, axis=0)
    full = lambda value, dtype: jnp.full((b, k), value, dtype)
    state = dict(t=jnp.int32(0), cache=_constrain(_take_cache_rows(out.cache, rows), mesh),
                 seen=expand(seen), pending=expand(pending), last=jnp.zeros((b * k,), jnp.int32),
                 run_tokens=jnp.full((b, k, n_new), pad, jnp.int32),
                 # Only beam 0 is live at first, so the K beams do not all pick the same tokens (HF).
                 run_scores=full(-1e9, jnp.float32).at[:, 0].set(0.0),
                 fin_tokens=jnp.full((b, k, n_new), pad, jnp.int32), fin_scores=full(-1e9, jnp.float32),
                 fin_num=full(0, jnp.int32), fin_reason=full(FINISH_LENGTH, jnp.int32),
                 fin_done=full(False, bool), improvable=jnp.ones((b,), bool), alive=jnp.bool_(True))
    return _beam_advance(state, expand(logits), consts, gen)


def _step(params, consts, state, *, config, gen, mesh):
    """Feeds the last chosen tokens through the cache and chooses the next ones (traced with the
    logical rules)."""
    tok = state["last"]
    # Finished greedy rows feed masked slots; beams always feed (HF keeps every beam's mask 1).
    mask = (~state["done"]) if gen.num_beams == 1 else jnp.ones(tok.shape, bool)
    out = Llama(config).apply({"params": params}, tok[:, None], mask.astype(jnp.int32)[:, None],
                              cache=state["cache"])
    state = {**state, "cache": out.cache}
    advance = _greedy_advance if gen.num_beams == 1 else _beam_advance
    return advance(state, out.logits[:, 0], consts, gen)


def _running(state, gen) -> jax.Array:
    if gen.num_beams == 1:
        return (state["t"] < gen.max_new_tokens) & ~jnp.all(state["done"])
    return state["alive"] & (state["t"] < gen.max_new_tokens)


def _result(state, gen) -> GenerationOutput:
    if gen.num_beams == 1:
        return GenerationOutput(tokens=state["tokens"], num_tokens=state["num"], finish_reason=state["reason"])
    # Finished hypotheses are kept sorted by score: slot 0 is each row's best.
    return GenerationOutput(tokens=state["fin_tokens"][:, 0], num_tokens=state["fin_num"][:, 0],
                            finish_reason=state["fin_reason"][:, 0], scores=state["fin_scores"][:, 0])


def _preview(state, gen) -> GenerationOutput:
    """The output so far: greedy rows as they stand, with beams the leading running hypothesis."""
    if gen.num_beams == 1:
        return _result(state, gen)
    b = state["run_tokens"].shape[0]
    return GenerationOutput(tokens=state["run_tokens"][:, 0], num_tokens=jnp.full((b,), state["t"], jnp.int32),
                            finish_reason=jnp.full((b,), FINISH_LENGTH, jnp.int32), scores=state["run_scores"][:, 0])


_start_jit = sharding.jit_with_rules(_start, static_argnames=("config", "gen", "mesh"))
_step_jit = sharding.jit_with_rules(_step, static_argnames=("config", "gen", "mesh"))
_result_jit = jax.jit(_result, static_argnames=("gen",))
_preview_jit = jax.jit(_preview, static_argnames=("gen",))


def _constrain(cache, mesh):
    return cache if mesh is None else jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def _take_cache_rows(cache, rows: jax.Array):
    """The cache with its batch rows gathered by `rows` (copies a row's K beams; reorders beams)."""
    if isinstance(cache.k, tuple):
        take = lambda xs: tuple(jnp.take(x, rows, axis=0) for x in xs)
    else:  # scanned layers: [num_layers, B, ...]
        take = lambda x: jnp.take(x, rows, axis=1)
    return cache.replace(k=take(cache.k), v=take(cache.v), mask=jnp.take(cache.mask, rows, axis=0))


def _greedy_advance(state, logits, consts, gen):
    """Greedy / sampled choice of one token per row; rows stop on eos or a stop string."""
    knobs, tables, t, done = consts.knobs, consts.tables, state["t"], state["done"]
    b = done.shape[0]
    tok = select_tokens(logits, state["seen"], gen, jax.random.fold_in(consts.rng, t), knobs)
    is_eos = jnp.any(tok[:, None] == knobs.eos[None, :], axis=-1)
    pending = state["pending"]
    if tables is not None:
        hit, pending = stop_step(tables, pending, tok)
    else:
        hit = jnp.zeros_like(done)
    newly = ~done & (is_eos | hit)
    out_tok = jnp.where(done, knobs.pad, tok)
    seen = state["seen"]
    if seen is not None:
        seen = seen.at[jnp.arange(b), tok].set(True)
    return {**state, "t": t + 1, "last": out_tok, "done": done | newly, "seen": seen, "pending": pending,
            "tokens": jax.lax.dynamic_update_slice_in_dim(state["tokens"], out_tok[:, None], t, axis=1),
            "num": jnp.where(done, state["num"], t + 1),
            "reason": jnp.where(newly, jnp.where(is_eos, FINISH_EOS, FINISH_STOP), state["reason"])}


def _beam_advance(state, logits, consts, gen):
    """One step of HF's beam search (`GenerationMixin._beam_search`, transformers 4.5x): every row
    keeps K running beams and its K best finished hypotheses, both sorted by score.

    The top M = max(2, 1 + #eos) * K continuations over all K x V (token, beam) pairs by summed
    log-prob (or M sampled without replacement when do_sample); those that end (eos, stop string,
    max_new_tokens) and rank in the top K are finished with score sum_logprob / new_tokens **
    length_penalty, the best K that go on become the running beams (the cache rows follow them).
    A row stops taking finished hypotheses once no running beam could beat its worst one (with
    early_stopping=True: once it holds K); the loop stops when no row can improve."""
    knobs, tables, t = consts.knobs, consts.tables, state["t"]
    b, k, n_new = state["run_tokens"].shape
    v = logits.shape[-1]
    n_eos = len(gen.eos_token_ids)
    m = max(2, 1 + n_eos) * k
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if state["seen"] is not None:
        logp = apply_repetition_penalty(logp, state["seen"], knobs.repetition_penalty)
    if gen.do_sample:   # HF keeps #eos + 1 tokens per beam so a beam can always go on
        logp = _warp(logp, knobs, min_keep=max(2, n_eos + 1))
    acc = (logp.reshape(b, k, v) + state["run_scores"][:, :, None]).reshape(b, k * v)
    if gen.do_sample:   # M draws without replacement from softmax(acc): the Gumbel top-k trick
        noisy = acc + jax.random.gumbel(jax.random.fold_in(consts.rng, t), acc.shape)
        idx = jax.lax.top_k(noisy, m)[1]
        vals = jnp.take_along_axis(acc, idx, axis=1)
        order = jnp.argsort(-vals, axis=1, stable=True)
        idx, vals = jnp.take_along_axis(idx, order, axis=1), jnp.take_along_axis(vals, order, axis=1)
    else:
        vals, idx = jax.lax.top_k(acc, m)
    src, tok = idx // v, (idx % v).astype(jnp.int32)                       # [b, m]
    cand = jnp.take_along_axis(state["run_tokens"], src[:, :, None], axis=1)
    cand = jnp.where(jnp.arange(n_new) == t, tok[:, :, None], cand)        # [b, m, n_new]

    is_eos = jnp.any(tok[..., None] == knobs.eos, axis=-1)
    pending = state["pending"]
    pending = jnp.take_along_axis(pending.reshape((b, k) + pending.shape[1:]), src[:, :, None, None], axis=1)
    if tables is not None:
        hit, pending = stop_step(tables, pending.reshape((b * m,) + pending.shape[2:]), tok.reshape(-1))
        hit, pending = hit.reshape(b, m), pending.reshape((b, m) + pending.shape[1:])
    else:
        hit = jnp.zeros_like(is_eos)
    ends = is_eos | hit | (t + 1 >= n_new)

    # The running beams: the best K continuations that did not end.
    run_vals = vals + ends.astype(jnp.float32) * -1.0e9
    keep = jax.lax.top_k(run_vals, k)[1]                                   # [b, k] into m
    pick = lambda x: jnp.take_along_axis(x, keep.reshape(keep.shape + (1,) * (x.ndim - 2)), axis=1)
    beam_src, next_tok = pick(src), pick(tok)
    flat_src = (jnp.arange(b)[:, None] * k + beam_src).reshape(-1)
    seen = state["seen"]
    if seen is not None:
        seen = jnp.take(seen, flat_src, axis=0).at[jnp.arange(b * k), next_tok.reshape(-1)].set(True)

    # The finished hypotheses: merge the top-K continuations that ended into the K best so far.
    ended = ends & (jnp.arange(m) < k)[None, :]
    lp = knobs.length_penalty
    fin_vals = vals / ((t + 1).astype(jnp.float32) ** lp)
    if gen.early_stopping is True:
        fin_vals = fin_vals + jnp.all(state["fin_done"], axis=-1, keepdims=True).astype(jnp.float32) * -1.0e9
    fin_vals = fin_vals + (~state["improvable"])[:, None].astype(jnp.float32) * -1.0e9
    fin_vals = fin_vals + (~ended).astype(jnp.float32) * -1.0e9
    reason = jnp.where(is_eos, FINISH_EOS, jnp.where(hit, FINISH_STOP, FINISH_LENGTH))
    merged = jnp.concatenate([state["fin_scores"], fin_vals], axis=1)
    best = jax.lax.top_k(merged, k)[1]
    merge = lambda old, new: jnp.take_along_axis(
        jnp.concatenate([old, new], axis=1), best.reshape(best.shape + (1,) * (old.ndim - 2)), axis=1)
    fin_done = merge(state["fin_done"], ended)
    fin_scores = merge(state["fin_scores"], fin_vals)
    run_scores = pick(run_vals)

    # Can a running beam still beat the worst finished one? (HF's heuristic: its score at the
    # current length, or at max_new_tokens for early_stopping="never" with a positive penalty.)
    t1 = t + 1
    best_len = t1
    if gen.early_stopping == "never":
        best_len = jnp.where(lp > 0, n_new, t1)
    best_possible = run_scores[:, :1] / (best_len.astype(jnp.float32) ** lp)
    worst = jnp.where(fin_done, jnp.min(fin_scores, axis=1, keepdims=True), -1.0e9)
    improvable = state["improvable"] & jnp.any(best_possible > worst, axis=-1)
    alive = jnp.any(improvable) & ~jnp.all(ends)
    if gen.early_stopping is True:
        alive = alive & ~jnp.all(fin_done)
    return {**state, "t": t1, "last": next_tok.reshape(-1), "seen": seen,
            "pending": pick(pending).reshape((b * k,) + pending.shape[2:]),
            "cache": _take_cache_rows(state["cache"], flat_src),
            "run_tokens": pick(cand), "run_scores": run_scores,
            "fin_tokens": merge(state["fin_tokens"], cand), "fin_scores": fin_scores,
            "fin_num": merge(state["fin_num"], jnp.full((b, m), t1, jnp.int32)),
            "fin_reason": merge(state["fin_reason"], reason), "fin_done": fin_done,
            "improvable": improvable, "alive": alive}


# ------------------------------------------------------------------------------------ host helpers

def pad_prompts(rows: Sequence[np.ndarray], *, multiple: int = 1, side: str = "left",
                pad_value: float | int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stacks variable-length prompts (ids [L] or embeds [L, D]) into `[B, L_max]` + a {0,1} mask.

    `multiple` rounds L_max up (so a chat's growing prompt reuses one compiled program per bucket).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("pad_prompts needs at least one prompt")
    rows = [np.asarray(r) for r in rows]
    if any(len(r) == 0 for r in rows):
        raise ValueError("pad_prompts: every prompt needs at least one token")
    length = max(len(r) for r in rows)
    length = -(-length // multiple) * multiple
    out = np.full((len(rows), length) + rows[0].shape[1:], pad_value, rows[0].dtype)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        out[i, sl] = r
        mask[i, sl] = 1
    return out, mask
