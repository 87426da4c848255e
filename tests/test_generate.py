"""Generation: KV-cache decode vs full forwards and HF `generate`, stop tokens/strings, sampling, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_reference as ref
from conftest import assert_close
from vllama_jax import sharding
from vllama_jax.convert.hf_llama import load_hf
from vllama_jax.generate import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenerationConfig, apply_repetition_penalty,
                                 generate, make_stop_tables, pad_prompts, stop_step, stream, token_texts, top_k_filter,
                                 top_p_filter)
from vllama_jax.models.llama import Llama

N_NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, our config, our params) with O(1) random weights, loaded through the converter."""
    model = ref.hf_model(seed=3)
    d = tmp_path_factory.mktemp("gen_llama")
    model.save_pretrained(d)
    config, params = load_hf(d, progress=False)
    return model, config, params


@pytest.fixture(scope="module")
def prompts():
    """A left-padded row (3 pads), a right-padded row (2 pads) and a full row."""
    rng = np.random.default_rng(11)
    ids = rng.integers(3, ref.VOCAB, size=(3, 8)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def greedy(tiny, prompts):
    _, config, params = tiny
    ids, mask = prompts
    return generate(params, config, GenerationConfig(max_new_tokens=N_NEW), input_ids=jnp.asarray(ids),
                    attention_mask=jnp.asarray(mask))


def _real(ids, mask):
    return [ids[i][mask[i] > 0] for i in range(len(ids))]


def test_greedy_equals_argmax_of_repeated_full_forwards(tiny, prompts, greedy):
    """No cache: each step re-runs the whole (unpadded, left-aligned) sequence and takes the argmax."""
    _, config, params = tiny
    ids, mask = prompts
    rows = _real(ids, mask)
    width = max(len(r) for r in rows) + N_NEW
    forward = jax.jit(lambda x, m: Llama(config).apply({"params": params}, x, m).logits)
    seqs = [list(r) for r in rows]
    for _ in range(N_NEW):
        buf, buf_mask = pad_prompts([np.asarray(s, np.int32) for s in seqs], side="right")
        buf = np.pad(buf, ((0, 0), (0, width - buf.shape[1])))
        buf_mask = np.pad(buf_mask, ((0, 0), (0, width - buf_mask.shape[1])))
        logits = np.asarray(forward(jnp.asarray(buf), jnp.asarray(buf_mask)))
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    expected = np.asarray([s[len(r):] for s, r in zip(seqs, rows)])
    np.testing.assert_array_equal(np.asarray(greedy.tokens), expected)
    np.testing.assert_array_equal(np.asarray(greedy.num_tokens), [N_NEW] * 3)
    np.testing.assert_array_equal(np.asarray(greedy.finish_reason), [FINISH_LENGTH] * 3)


def _hf_generate(model, ids, mask, **kw):
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=N_NEW, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:].numpy()


def _left_padded(ids, mask):
    return pad_prompts(_real(ids, mask), side="left")


def test_greedy_equals_hf_generate(tiny, prompts, greedy):
    model, _, _ = tiny
    ids, mask = _left_padded(*prompts)
    expected = _hf_generate(model, ids, mask, do_sample=False, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), expected)


def test_embeds_prompt_equals_ids_prompt(tiny, prompts, greedy):
    _, config, params = tiny
    ids, mask = prompts
    embeds = Llama(config).apply({"params": params}, jnp.asarray(ids), method=Llama.embed)
    out = generate(params, config, GenerationConfig(max_new_tokens=N_NEW), inputs_embeds=embeds,
                   attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def test_eos_stops_rows_and_pads_like_hf(tiny, prompts, greedy):
    model, config, params = tiny
    g = np.asarray(greedy.tokens)
    eos = int(g[0, 4])  # row 0 stops at its first occurrence of this token
    gen = GenerationConfig(max_new_tokens=N_NEW, eos_token_ids=(eos,), pad_token_id=0)
    ids, mask = prompts
    out = generate(params, config, gen, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    tokens, num = np.asarray(out.tokens), np.asarray(out.num_tokens)
    for i in range(3):
        hits = np.flatnonzero(g[i] == eos)
        stop = int(hits[0]) + 1 if hits.size else N_NEW
        assert num[i] == stop
        np.testing.assert_array_equal(tokens[i, :stop], g[i, :stop])
        assert (tokens[i, stop:] == 0).all()
        assert out.finish_reason[i] == (FINISH_EOS if hits.size else FINISH_LENGTH)
    assert num[0] <= 5
    left_ids, left_mask = _left_padded(ids, mask)
    expected = _hf_generate(model, left_ids, left_mask, do_sample=False, eos_token_id=eos)
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)


# ---------------------------------------------------------------------------------- stop strings

HASH_VOCAB = ["a", "#", "##", "###", "a#", "#a", "b##", "", "x###y"]


def _run_stop(texts, seq, stops=("###",)):
    tables = make_stop_tables(stops, texts)
    pending = jnp.zeros((1,) + tables.finishes.shape[::2], bool)
    hits = []
    for tok in seq:
        hit, pending = stop_step(tables, pending, jnp.asarray([tok], jnp.int32))
        hits.append(bool(hit[0]))
    return hits


@pytest.mark.parametrize("seq,first_stop", [
    ([0, 1, 1, 1], 3),          # "#" + "#" + "#"
    ([2, 1], 1),                # "##" + "#"
    ([4, 2], 1),                # "a#" + "##"
    ([1, 0, 2], None),          # "#a##" has no "###"
    ([1, 7, 2], 2),             # an empty token keeps the pending match
    ([0, 8], 1),                # the whole string inside one token
    ([6, 5], 1),                # "b##" + "#a"
    ([1, 1, 0, 1, 1], None),    # "##a##"
])
def test_stop_string_automaton_on_hand_vocab(seq, first_stop):
    hits = _run_stop(HASH_VOCAB, seq)
    assert (hits.index(True) if True in hits else None) == first_stop


def test_stop_strings_match_decoded_text_of_a_real_tokenizer(tmp_path):
    """Token texts from a LLaMA-like tokenizer: the first token whose running decode contains the
    stop string is where the automaton stops, for many ways of writing it."""
    from data_pipelines.tokenizer import build_demo_tokenizer, load_tokenizer
    corpus = ["###Human: what is it ###Assistant: a red circle", "## # ### #### </s> hi#", "a#b ##c"] * 20
    tok = load_tokenizer(build_demo_tokenizer(corpus, tmp_path / "tok", vocab_size=400))
    texts = token_texts(tok)
    stops = ("###", "</s>")
    tables = make_stop_tables(stops, texts)
    for sample in ["a red ###Human", "x ## # and more", "ab#c##d#", "####", "hi#</s>", "no stop here",
                   "#a##", "a </ s>"]:
        ids = tok(sample, add_special_tokens=False)["input_ids"]
        pending = jnp.zeros((1,) + tables.finishes.shape[::2], bool)
        got = None
        for i, t in enumerate(ids):
            hit, pending = stop_step(tables, pending, jnp.asarray([t], jnp.int32))
            if bool(hit[0]):
                got = i
                break
        want = next((i for i in range(len(ids))
                     if any(s in tok.decode(ids[:i + 1]) for s in stops)), None)
        assert got == want, (sample, ids, got, want)


def test_generation_stops_on_stop_string(tiny, prompts, greedy):
    """Texts made so that row 0's tokens k and k+1 read "x##" + "#y": the row stops at k+1; every
    row stops at the first token whose running text contains "###"."""
    _, config, params = tiny
    g = np.asarray(greedy.tokens)
    k = next(k for k in range(1, N_NEW - 2) if g[0, k] != g[0, k + 1] and g[0, k] not in g[0, :k]
             and g[0, k + 1] not in g[0, :k])
    texts = ["z"] * config.vocab_size
    texts[g[0, k]], texts[g[0, k + 1]] = "x##", "#y"
    gen = GenerationConfig(max_new_tokens=N_NEW, stop_strings=("###",))
    ids, mask = prompts
    out = generate(params, config, gen, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                   stop_tables=make_stop_tables(gen.stop_strings, texts))
    for i in range(3):
        running = np.cumsum([len(texts[t]) for t in g[i]])
        text = "".join(texts[t] for t in g[i])
        pos = text.find("###")
        stop = int(np.searchsorted(running, pos + 3)) + 1 if pos >= 0 else N_NEW
        assert int(out.num_tokens[i]) == stop
        assert int(out.finish_reason[i]) == (FINISH_STOP if pos >= 0 else FINISH_LENGTH)
        np.testing.assert_array_equal(np.asarray(out.tokens[i, :stop]), g[i, :stop])
        assert (np.asarray(out.tokens[i, stop:]) == 0).all()
    assert int(out.num_tokens[0]) == k + 2
    with pytest.raises(ValueError, match="need stop_tables"):
        generate(params, config, gen, input_ids=jnp.asarray(ids))


# ---------------------------------------------------------------------------------- sampling

def test_sampling_is_deterministic_per_rng_and_top_k_1_is_greedy(tiny, prompts, greedy):
    _, config, params = tiny
    ids, mask = jnp.asarray(prompts[0]), jnp.asarray(prompts[1])
    hot = GenerationConfig(max_new_tokens=N_NEW, do_sample=True, temperature=2.0, top_p=0.95)
    a = generate(params, config, hot, input_ids=ids, attention_mask=mask, rng=jax.random.key(1))
    b = generate(params, config, hot, input_ids=ids, attention_mask=mask, rng=jax.random.key(1))
    c = generate(params, config, hot, input_ids=ids, attention_mask=mask, rng=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    assert (np.asarray(a.tokens) != np.asarray(greedy.tokens)).any()
    k1 = GenerationConfig(max_new_tokens=N_NEW, do_sample=True, top_k=1, temperature=0.7)
    d = generate(params, config, k1, input_ids=ids, attention_mask=mask, rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(d.tokens), np.asarray(greedy.tokens))


def test_logits_processors_match_hf():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper
    # Hand example: tokens 0 (positive logit) and 3 (negative) were seen, 1 was not.
    logits = np.asarray([[2.0, -1.0, 0.5, -3.0]], np.float32)
    seen = np.asarray([[True, False, False, True]])
    ours = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.5))
    np.testing.assert_allclose(ours, [[2.0 / 1.5, -1.0, 0.5, -3.0 * 1.5]], rtol=1e-6)
    hf = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 3, 0]]), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, hf, rtol=1e-6)

    x = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 2
    for p in (0.3, 0.9):
        hf = TopPLogitsWarper(p)(None, torch.tensor(x)).numpy()
        np.testing.assert_array_equal(np.asarray(top_p_filter(jnp.asarray(x), p)), hf)
    hf = TopKLogitsWarper(5)(None, torch.tensor(x)).numpy()
    np.testing.assert_array_equal(np.asarray(top_k_filter(jnp.asarray(x), 5)), hf)


def test_repetition_penalty_greedy_equals_hf(tiny, prompts, greedy):
    model, config, params = tiny
    ids = prompts[0][2:]   # the full row only: HF also penalises the pad ids of padded rows
    gen = GenerationConfig(max_new_tokens=N_NEW, repetition_penalty=1.8)
    out = generate(params, config, gen, input_ids=jnp.asarray(ids))
    expected = _hf_generate(model, ids, np.ones_like(ids), do_sample=False, eos_token_id=None,
                            repetition_penalty=1.8)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert (np.asarray(greedy.tokens[2:]) != expected).any()   # the penalty changed something


# ---------------------------------------------------------------------------------- beam search

def _hf_beams(model, ids, mask, **kw):
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=N_NEW, pad_token_id=0, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **kw)
    scores = out.get("sequences_scores")
    return out.sequences[:, ids.shape[1]:].numpy(), None if scores is None else scores.numpy()


@pytest.mark.parametrize("num_beams,early_stopping,length_penalty,eos_rows", [
    (1, False, 1.0, (0,)),
    (2, False, 1.0, (0,)),
    (2, True, 0.0, (1, 2)),
    (4, False, 1.0, (0,)),
    (4, True, -0.5, (1, 2)),
    (4, "never", 2.0, (1, 2)),
])
def test_beam_search_equals_hf_generate(tiny, prompts, greedy, num_beams, early_stopping, length_penalty, eos_rows):
    """Tokens (and beam scores) of HF `generate(num_beams=k, do_sample=False)` on the same weights,
    with eos ids taken from the greedy output so hypotheses finish early in some rows."""
    model, config, params = tiny
    g = np.asarray(greedy.tokens)
    eos = tuple(int(g[r, 3 + r]) for r in eos_rows)
    ids, mask = _left_padded(*prompts)
    want, want_scores = _hf_beams(model, ids, mask, num_beams=num_beams, early_stopping=early_stopping,
                                  length_penalty=length_penalty, eos_token_id=list(eos))
    gen = GenerationConfig(max_new_tokens=N_NEW, num_beams=num_beams, early_stopping=early_stopping,
                           length_penalty=length_penalty, eos_token_ids=eos)
    out = generate(params, config, gen, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    rows = out.rows()
    for i, row in enumerate(rows):
        assert row == want[i, :len(row)].tolist(), (i, row, want[i])
        # HF pads a shorter hypothesis with its fill value (eos when pad is 0) up to the batch's longest.
        assert len(row) == want.shape[1] or len(set(want[i, len(row):].tolist())) == 1
        assert int(out.finish_reason[i]) == (FINISH_EOS if row[-1] in eos else FINISH_LENGTH)
    assert max(len(r) for r in rows) == want.shape[1]
    if num_beams > 1:
        np.testing.assert_allclose(np.asarray(out.scores), want_scores, rtol=1e-5, atol=1e-5)
    if (num_beams, length_penalty) in ((2, 1.0), (4, -0.5)):
        assert min(len(r) for r in rows) < N_NEW      # some hypothesis ended on eos
    if num_beams == 4:
        assert rows != g.tolist()                       # beams found something greedy did not


def test_beam_search_stop_string_acts_like_its_eos_token(tiny, prompts, greedy):
    """A stop string that only one token's text holds ends hypotheses exactly where that token as
    eos does (the stop automaton's pending state follows the beams)."""
    _, config, params = tiny
    tok = int(np.asarray(greedy.tokens)[0, 3])
    texts = ["z"] * config.vocab_size
    texts[tok] = "#"
    ids, mask = jnp.asarray(prompts[0]), jnp.asarray(prompts[1])
    base = GenerationConfig(max_new_tokens=N_NEW, num_beams=3, length_penalty=0.0)
    by_eos = generate(params, config, base.replace(eos_token_ids=(tok,)), input_ids=ids, attention_mask=mask)
    by_stop = generate(params, config, base.replace(stop_strings=("###",)), input_ids=ids, attention_mask=mask,
                       stop_tables=make_stop_tables(("###",), texts))
    assert min(int(n) for n in by_eos.num_tokens) < N_NEW
    # "###" needs three "#" in a row where eos needs one: compare against the automaton's own rule.
    for row_eos, row_stop in zip(by_eos.rows(), by_stop.rows()):
        text = "".join(texts[t] for t in row_stop)
        assert ("###" in text) == (row_stop[-3:] == [tok] * 3)
    texts_single = ["z"] * config.vocab_size
    texts_single[tok] = "###"
    by_stop1 = generate(params, config, base.replace(stop_strings=("###",)), input_ids=ids, attention_mask=mask,
                        stop_tables=make_stop_tables(("###",), texts_single))
    assert by_stop1.rows() == by_eos.rows()
    np.testing.assert_array_equal(np.asarray(by_stop1.scores), np.asarray(by_eos.scores))
    reasons = np.asarray(by_stop1.finish_reason)
    assert ((reasons == FINISH_STOP) == (np.asarray(by_eos.finish_reason) == FINISH_EOS)).all()


def test_beam_sampling_is_deterministic_per_rng(tiny, prompts):
    _, config, params = tiny
    ids, mask = jnp.asarray(prompts[0]), jnp.asarray(prompts[1])
    gen = GenerationConfig(max_new_tokens=N_NEW, num_beams=2, do_sample=True, temperature=1.5, top_p=0.9)
    a, b, c = (generate(params, config, gen, input_ids=ids, attention_mask=mask, rng=jax.random.key(s))
               for s in (1, 1, 2))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_stream_ends_with_what_generate_returns(tiny, prompts, num_beams):
    _, config, params = tiny
    ids, mask = jnp.asarray(prompts[0]), jnp.asarray(prompts[1])
    gen = GenerationConfig(max_new_tokens=N_NEW, num_beams=num_beams, do_sample=num_beams == 1, top_k=20)
    whole = generate(params, config, gen, input_ids=ids, attention_mask=mask, rng=jax.random.key(7))
    steps = list(stream(params, config, gen, input_ids=ids, attention_mask=mask, rng=jax.random.key(7)))
    assert len(steps) == N_NEW
    assert [int(n) for n in steps[0].num_tokens] == [1, 1, 1]
    assert [int(s.num_tokens.max()) for s in steps] == list(range(1, N_NEW + 1))
    for name in ("tokens", "num_tokens", "finish_reason") + (("scores",) if num_beams > 1 else ()):
        np.testing.assert_array_equal(np.asarray(getattr(steps[-1], name)), np.asarray(getattr(whole, name)))
    if num_beams == 1:   # greedy / sampled rows only grow
        for before, after in zip(steps, steps[1:]):
            for r0, r1 in zip(before.rows(), after.rows()):
                assert r1[:len(r0)] == r0


# ---------------------------------------------------------------------------------- sharding

def test_sharded_generation_equals_single_device(tiny):
    _, config, params = tiny
    rng = np.random.default_rng(5)
    ids = rng.integers(3, ref.VOCAB, size=(4, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, -1:] = 0
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=20, eos_token_ids=(7,))
    single = generate(params, config, gen, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                      rng=jax.random.key(4))

    mesh = sharding.make_mesh((2, 2, 2))
    abstract = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.asarray(ids))
    shardings = sharding.param_shardings(abstract, mesh)["params"]
    sharded_params = jax.device_put(params, shardings)
    batch = sharding.shard_batch({"ids": ids, "mask": mask}, mesh)
    out = generate(sharded_params, config, gen, input_ids=batch["ids"], attention_mask=batch["mask"],
                   rng=jax.random.key(4), mesh=mesh)
    assert tuple(sharded_params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec) == ("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(single.tokens))
    np.testing.assert_array_equal(np.asarray(out.num_tokens), np.asarray(single.num_tokens))


def test_bad_inputs_raise(tiny):
    _, config, params = tiny
    ids = jnp.ones((2, 4), jnp.int32)
    gen = GenerationConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        generate(params, config, gen)
    with pytest.raises(ValueError, match="no real token"):
        generate(params, config, gen, input_ids=ids, attention_mask=jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, length\]"):
        generate(params, config, gen, input_ids=ids, attention_mask=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        generate(params, config, gen, inputs_embeds=jnp.ones((2, 4, 3)))
    for bad in (dict(max_new_tokens=0), dict(top_p=0.0), dict(temperature=0.0), dict(top_k=-1),
                dict(stop_strings=("",)), dict(num_beams=0), dict(early_stopping="sometimes")):
        with pytest.raises(ValueError, match="GenerationConfig"):
            GenerationConfig(**bad)
    assert GenerationConfig(eos_token_ids=2, stop_strings="###").eos_token_ids == (2,)
    with pytest.raises(ValueError, match="more than the vocab"):
        generate(params, config, GenerationConfig(max_new_tokens=2, num_beams=config.vocab_size), input_ids=ids)
