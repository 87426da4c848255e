"""Evaluation: metrics against hand-computed values, answer parsing, an end-to-end eval of a tiny
random model on tiny shards (prompt text, answers vs direct generation, the JSON report), and
clear errors for bad input."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import synthetic
from data_pipelines.records import encode_example, encode_jpeg, make_example
from data_pipelines.shards import WRITER_OPTIONS
from vllama_jax.evaluate import cli, metrics, runner
from vllama_jax.generate import GenerationConfig, generate, pad_prompts, stop_tables_for
from vllama_jax.inference import InferenceModel, save_params_msgpack
from vllama_jax.models.llama import LlamaConfig
from vllama_jax.models.video_llama import VideoLlamaConfig, init_params

CONFIG_FILE = '''
from vllama_jax.models.llama import LlamaConfig
from vllama_jax.models.video_llama import VideoLlamaConfig

def get_config():
    return VideoLlamaConfig.preset("tiny").replace(llama=LlamaConfig.preset("tiny", vocab_size=512),
                                                   max_frame_pos=4, max_audio_pos=2)
'''


# ---------------------------------------------------------------------------------- metrics

def test_bleu_by_hand():
    # 1-grams 5/6 ("the" clipped to 1), 2-grams 3/5, 3-grams 2/4, 4-grams 1/3, equal lengths.
    cand, ref = "The cat sat on the mat.", "the cat sat on a mat"
    assert metrics.bleu([cand], [ref]) == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert metrics.bleu([cand], [ref], max_n=1) == pytest.approx(5 / 6)
    assert metrics.bleu([cand], [ref], max_n=2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    # All n-grams match, 4 words against 6: only the brevity penalty exp(1 - 6/4).
    assert metrics.bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-0.5))
    # Closest reference length (5 is closer to 4 than 9) and clipping against the best reference.
    assert metrics.bleu(["the cat sat on"], [["a b c d e f g h i", "the cat sat on it"]]) == pytest.approx(
        math.exp(1 - 5 / 4))
    # Corpus level: counts are summed before the ratios, not averaged per sentence.
    got = metrics.bleu(["a b c d", "x y"], ["a b c d", "x z"], max_n=2)
    assert got == pytest.approx(math.sqrt((4 + 1) / (4 + 2) * (3 + 0) / (3 + 1)))
    assert metrics.bleu(["a b c"], ["x y z"]) == 0.0 and metrics.bleu([""], ["a"]) == 0.0
    assert metrics.bleu(["w x y z"], ["w x y z"]) == pytest.approx(1.0)


def test_cider_d_by_hand():
    # Two clips with disjoint words: every n-gram has df 1, IDF log 2; a candidate equal to its
    # reference has cosine 1 at every order and no length penalty: 10 per clip.
    refs = ["a red circle moves", "the blue square jumps"]
    assert metrics.cider(refs, refs) == pytest.approx(10.0)
    # An order the sentence is too short for scores 0 (as coco-caption): 3 words have no 4-gram.
    assert metrics.cider(["a red circle moves", "the blue square"], ["a red circle moves", "the blue square"]) == \
        pytest.approx((10.0 + 7.5) / 2)
    # An n-gram found in every reference set has IDF log(2) - log(2) = 0: it counts for nothing.
    assert metrics.cider(["x", "x"], ["x", "x"]) == 0.0
    # Unigrams only, worked by hand: clips {"a b"}, {"a c"}; candidate 1 "a b b" (3 words vs 2).
    # df: a=2, b=1, c=1; idf: a=0, b=c=log 2. cand vec b: 2 log2, ref vec b: log2.
    # dot = min(2l, l) * l = l^2; norms 2l and l -> cos 1/2; penalty exp(-1/72).
    l2 = math.log(2)
    clip1 = 10 * (min(2 * l2, l2) * l2) / (2 * l2 * l2) * math.exp(-1 / 72)
    clip2 = 10.0  # "a c" against itself
    assert metrics.cider(["a b b", "a c"], ["a b", "a c"], max_n=1) == pytest.approx((clip1 + clip2) / 2)
    # Several references: the per-reference similarities are averaged.
    two = metrics.cider(["a b", "c d"], [["a b", "a e"], ["c d", "c d"]], max_n=1)
    # df over reference sets: a=1, b=1, e=1, c=1, d=1 -> all IDF log 2; clip 1: ref "a b" cos 1,
    # ref "a e": dot l^2 over (sqrt2 l)^2 = 1/2 -> mean 3/4; clip 2: 1.
    assert two == pytest.approx(10 * (0.75 + 1.0) / 2)


def test_metric_inputs_are_checked():
    with pytest.raises(metrics.EvalError, match="2 candidates but 1 reference"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(metrics.EvalError, match="at least one reference"):
        metrics.cider(["a"], [[]])
    with pytest.raises(metrics.EvalError, match="unknown attribute 'smell'"):
        metrics.score_attributes([{"smell": "bad"}], [{"smell": "bad"}])


def test_answer_parsing():
    colours = synthetic.ATTRIBUTES["colour"]
    assert metrics.normalize_answer("  Red!!  circle, moving_left ") == "red circle moving left"
    assert metrics.parse_choice("Red.", colours) == "red"
    assert metrics.parse_choice("red, I think blue", colours) == "red"          # the first word decides
    assert metrics.parse_choice("It is BLUE.", colours) == "blue"               # the only value named
    assert metrics.parse_choice("blue or green", colours) == "blue"
    assert metrics.parse_choice("either green or blue", colours) is None        # several named: no answer
    assert metrics.parse_choice("a reddish one", colours) is None               # whole words only
    assert metrics.parse_choice("", colours) is None


def test_score_attributes_and_qa_accuracy():
    labels = [{"colour": "red", "pitch": "low", "split": "test"}, {"colour": "blue", "pitch": "low"},
              {"colour": "red", "pitch": "high"}, {"colour": "green", "pitch": "low"}]
    answers = [{"colour": "red", "pitch": "low"}, {"colour": "It is blue.", "pitch": "medium"},
               {"colour": "green", "pitch": "high"}, {"colour": "hmm", "pitch": "low"}]
    s = metrics.score_attributes(answers, labels)
    c, p = s["per_attribute"]["colour"], s["per_attribute"]["pitch"]
    assert (c["correct"], c["total"], c["accuracy"], c["chance"], c["majority"], c["unparsed"]) == \
        (2, 4, 0.5, 0.25, 0.5, 1)
    assert c["confusion"] == {"blue": {"blue": 1}, "green": {"None": 1}, "red": {"red": 1, "green": 1}}
    assert (p["correct"], p["majority"]) == (3, 0.75)
    assert s["overall"] == 5 / 8 and s["total"] == 8
    assert s["groups"]["visual"] == {"accuracy": 0.5, "chance": 0.25, "attributes": ["colour"]}
    assert s["groups"]["audio"]["accuracy"] == 0.75
    q = metrics.qa_accuracy(["Red.", "a red one", "blue"], ["red", "red", "a blue circle"])
    assert q == {"count": 3, "exact": 1 / 3, "contains": 2 / 3}


# ---------------------------------------------------------------------------------- end to end

def tiny_config() -> VideoLlamaConfig:
    return VideoLlamaConfig.preset("tiny").replace(llama=LlamaConfig.preset("tiny", vocab_size=512),
                                                   max_frame_pos=4, max_audio_pos=2)


def random_params(config, seed=0):
    """Random params without compiling the init: N(0, 0.05), norm scales near 1."""
    abstract = jax.eval_shape(lambda r: init_params(config, r)["params"], jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        scale = "scale" in name or "weight" in name
        return ((1.0 if scale else 0.0) + (0.1 if scale else 0.05) * rng.standard_normal(x.shape)).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def clip_records(n, rng, audio=True):
    attrs = synthetic.balanced_attributes(n, rng)
    out = []
    for i, a in enumerate(attrs):
        frames = [encode_jpeg(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)) for _ in range(8)]
        common = dict(media="video", frames=frames, frame_times=np.arange(8) * 0.5,
                      fbank=rng.standard_normal((2, 1, 128, 204)).astype(np.float16) if audio and i else None,
                      audio_present=bool(audio and i), meta=dict(a, split="test"))
        out.append(make_example(id=f"demo/test/{i}/instruct", kind="conversation",
                                conversations=synthetic.conversation(a, rng), **common))
        out.append(make_example(id=f"demo/test/{i}/caption", kind="caption", caption=synthetic.caption(a), **common))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_pipelines.tokenizer import build_demo_tokenizer, load_tokenizer

    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    corpus = [synthetic.caption(a) for a in synthetic.balanced_attributes(16, rng)]
    corpus += ["###Human: <Video></Video> " + q + " ###Assistant: " + v
               for q in synthetic.QUESTIONS.values() for v in ("red", "low", "left")]
    tok_dir = build_demo_tokenizer(corpus * 3, d / "tokenizer", vocab_size=420)
    records = clip_records(3, rng)
    shard = str(d / "demo-test-00000-of-00001.array_record")
    writer = ArrayRecordWriter(shard, WRITER_OPTIONS)
    for ex in records:
        writer.write(encode_example(ex))
    writer.close()
    config = tiny_config()
    model = InferenceModel(config, random_params(config), load_tokenizer(tok_dir), "vicuna", num_frames=4,
                           image_size=config.vit.img_size, num_audio_clips=2)
    return {"dir": d, "tok_dir": str(tok_dir), "shard": shard, "records": records, "model": model}


def direct_answer(model, prompt_text, record, media, max_new_tokens):
    """The answer by hand: the loader's eval frames, the soft tokens written into the embedding
    rows of the placeholders with numpy, greedy generation. The row is left-padded to the eval's
    shape [4, 64] only so the compiled program is reused (padding itself is test_generate's)."""
    from data_pipelines import video
    from data_pipelines.records import decode_jpeg
    from data_pipelines.tokenizer import TextEncoder
    from vllama_jax.media_encoding import encode_media

    enc = TextEncoder(model.tokenizer)
    ids = np.asarray(enc(prompt_text))
    patch = ids == enc.patch_id
    idx = video.sample_indices(len(record["frames"]), 4, "uniform")
    frames = video.eval_transform(np.stack([decode_jpeg(record["frames"][i]) for i in idx]), model.image_size)
    inputs = {"video": ("encode_video", frames), "audio": ("encode_audio", np.float32(record["fbank"]))}
    soft = np.concatenate([np.asarray(encode_media(model.params, jnp.asarray(inputs[m][1])[None], config=model.config,
                                                   method=inputs[m][0]))[0] for m in media])
    embeds = np.asarray(model.params["llama"]["embed_tokens"]["embedding"])[np.where(patch, 0, ids)]
    embeds[patch] = soft
    rows, mask = pad_prompts([embeds] * 4, multiple=64, side="left")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=(2,), stop_strings=("###",))
    tables = stop_tables_for(model.tokenizer, ("###",), model.config.llama.vocab_size)
    tokens = generate(model.params["llama"], model.config.llama, gen, inputs_embeds=jnp.asarray(rows),
                      attention_mask=jnp.asarray(mask), stop_tables=tables).rows()[0]
    tokens = tokens[:-1] if tokens and tokens[-1] == 2 else tokens
    return model.tokenizer.decode(tokens, skip_special_tokens=False).split("###")[0].strip()


def test_prompts_are_the_training_text_cut_at_the_answer(world):
    from data_pipelines import prompts
    from data_pipelines.tokenizer import TextEncoder

    assert runner.qa_prompt("<ImageHere>\nWhat is it?", "image", 2, "vicuna") == \
        "\n\n###Human: <Image><ImageHere><ImageHere></Image>\nWhat is it?\n###Assistant:"
    assert runner.qa_prompt("What is it?", "video", 2, "llama_v2", "msg. ") == \
        "[INST] <<SYS>>\n \n<</SYS>>\n\n<Video><ImageHere><ImageHere></Video> msg. What is it? [/INST]"
    # Token level: the prompt's ids are the first ids of the training conversation's, so the
    # model's next token is the answer's first (with its word-start space) as in training.
    enc = TextEncoder(world["model"].tokenizer)
    turns = [{"from": "human", "value": "<ImageHere> What colour is the object?"}, {"from": "gpt", "value": "red"}]
    for style in ("vicuna", "llama_v2"):
        prompt = enc(runner.qa_prompt(turns[0]["value"], "video", 3, style, "msg. "))
        train, _ = prompts.tokenize_conversation(prompts.insert_media(turns, "video", 3, "msg. "), enc, style)
        assert train[:len(prompt)] == prompt, style
        assert "".join(enc.tokenizer.convert_ids_to_tokens(train[len(prompt):])).startswith("\u2581red"), style
    with pytest.raises(metrics.EvalError, match="conv_style must be one of"):
        runner.qa_prompt("Q?", "video", 1, "chatml")


def test_end_to_end_report(world, tmp_path):
    import dataclasses

    records = world["records"]
    # Stage-2 Vicuna captions end with "###" like the answers, and one 64 bucket holds every prompt:
    # the questions and captions share one compiled generate program (the suite stays fast).
    lc = dataclasses.replace(runner.default_loader_config(world["model"]), end_sym="###")
    report = runner.run_eval(world["model"], world["shard"], loader_config=lc, batch_size=4, max_new_tokens=5,
                             bucket=64, progress=False)
    assert report["settings"]["stop_strings"] == {"qa": ["###"], "caption": ["###"]}
    ex = report["examples"]
    assert len(ex) == 3 * (5 + 1)
    assert [e["kind"] for e in ex[:6]] == ["qa"] * 5 + ["caption"]
    # Clip 0 has no sound: video only; the others: audio soft tokens first, then video.
    assert ex[0]["media"] == ["video"] and ex[6]["media"] == ["audio", "video"]
    times = "The video contains 4 frames sampled at 0.0, 1.0, 2.0, 3.0 seconds. "
    q0 = records[0]["conversations"][0]["value"].replace("<ImageHere> ", "")
    assert ex[0]["prompt"] == f"\n\n###Human: <Video><ImageHere>x8</Video> {times}{q0}\n###Assistant:"
    assert ex[6]["prompt"].startswith("\n\n###Human: <Video><ImageHere>x12</Video> ")
    assert ex[5]["prompt"] == "<ImageHere>x8" and ex[5]["reference"] == records[1]["caption"]
    for e in ex:
        assert isinstance(e["answer"], str) and e["finish"] in ("length", "eos", "stop_string")
        assert isinstance(e["correct"], bool) if e["kind"] == "qa" else "correct" not in e
    labelled = [e for e in ex if e["kind"] == "qa"]
    assert all(e["label"] == records[2 * (i // 5)]["meta"][e["attribute"]] for i, e in enumerate(labelled))
    m = report["metrics"]
    assert m["attributes"]["total"] == 15 and set(m["attributes"]["per_attribute"]) == set(synthetic.ATTRIBUTES)
    assert set(m["attributes"]["groups"]) == {"visual", "audio"}
    assert m["qa"]["count"] == 15 and set(m["captions"]) == {"count", "bleu1", "bleu2", "bleu3", "bleu4", "cider_d"}
    # Batched, left-padded, bucketed answers equal one-row greedy generation on the same prompt.
    for i, rec_i, media in ((0, 0, ("video",)), (8, 2, ("audio", "video"))):
        turns = records[rec_i]["conversations"]
        k = 8 if media == ("video",) else 12
        text = runner.qa_prompt(turns[2 * (i % 6)]["value"], "video", k, "vicuna", times)
        assert ex[i]["answer"] == direct_answer(world["model"], text, records[rec_i], media, 5), i
    path = runner.write_report(report, tmp_path / "out" / "report.json")
    loaded = json.loads(open(path).read())
    assert loaded["metrics"]["qa"]["count"] == 15 and len(loaded["examples"]) == 18
    assert "accuracy" in metrics.format_summary(report)
    # Only the questions, video only, from decoded dicts, the first record only.
    small = runner.run_eval(world["model"], records[:1], media=("video",), kinds=("qa",), batch_size=4,
                            max_new_tokens=5, bucket=64, progress=False)
    assert [e["answer"] for e in small["examples"]] == [e["answer"] for e in ex[:5]]


def test_cli_writes_a_report(world, tmp_path):
    params_file = save_params_msgpack(world["model"].params, tmp_path / "params.msgpack")
    out = tmp_path / "report.json"
    rc = cli.main(["--checkpoint", str(params_file), "--config", str(_config_file(tmp_path)), "--tokenizer",
                   world["tok_dir"], "--shards", world["shard"], "--out", str(out), "--batch-size", "4",
                   "--max-new-tokens", "5", "--bucket", "64", "--limit", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert len(report["examples"]) == 5 and report["settings"]["shards"] == [world["shard"]]


def test_bad_input_gives_clear_errors(world, tmp_path, capsys):
    with pytest.raises(metrics.EvalError, match="does not exist"):
        runner.run_eval(world["model"], str(tmp_path / "missing.array_record"), progress=False)
    with pytest.raises(metrics.EvalError, match="matches no file"):
        runner.run_eval(world["model"], str(tmp_path / "nothing-*.array_record"), progress=False)
    with pytest.raises(metrics.EvalError, match="shard paths / globs or decoded example dicts"):
        runner.run_eval(world["model"], [42], progress=False)
    with pytest.raises(metrics.EvalError, match="no qa / caption items in the 0 records"):
        runner.run_eval(world["model"], [], progress=False)
    small_vocab = world["model"].config.replace(llama=LlamaConfig.preset("tiny"))
    with pytest.raises(metrics.EvalError, match="this tokenizer does not belong to this model"):
        runner.run_eval(InferenceModel(small_vocab, {}, world["model"].tokenizer), world["records"], progress=False)
    no_audio = InferenceModel(world["model"].config.replace(audio_qformer=None, imagebind_audio=None,
                                                            imagebind_vision=None), {}, world["model"].tokenizer)
    with pytest.raises(metrics.EvalError, match="media must list 'audio' and/or 'video' once each"):
        runner.run_eval(world["model"], world["records"], media=("video", "video"), progress=False)
    with pytest.raises(metrics.EvalError, match="kinds must be among"):
        runner.run_eval(world["model"], world["records"], kinds=("qa", "vqa"), progress=False)
    with pytest.raises(metrics.EvalError, match="model has no audio branch"):
        runner.run_eval(no_audio, world["records"], media=("audio", "video"), progress=False)
    # A stored fbank of another clip count than the model's (media_encoding.record_media's check).
    other_clips = dict(world["records"][2], fbank=np.zeros((3, 1, 128, 204), np.float16))
    with pytest.raises(metrics.EvalError, match=r"fbank shape \(3, 1, 128, 204\), expected \(2, 1, 128, 204\)"):
        runner.run_eval(world["model"], [other_clips], kinds=("qa",), progress=False)
    rc = cli.main(["--checkpoint", str(tmp_path / "none.msgpack"), "--config", "tiny", "--tokenizer",
                   world["tok_dir"], "--shards", world["shard"]])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli.main(["--checkpoint", str(save_params_msgpack(world["model"].params, tmp_path / "p.msgpack")),
                   "--config", str(_config_file(tmp_path)), "--tokenizer", world["tok_dir"],
                   "--shards", str(tmp_path / "gone.array_record")])
    err = capsys.readouterr().err
    assert rc == 2 and "gone.array_record" in err and "does not exist" in err


def _config_file(tmp_path):
    path = tmp_path / "tiny_eval_config.py"
    path.write_text(CONFIG_FILE)
    return path


@pytest.mark.slow
@pytest.mark.ci
def test_eval_on_the_synthetic_writer_output(world, tmp_path):
    """Records as the demo writes them (rendered mp4s: 16 stored frames, 8 fbank clips) through a
    model with the reference's 8 frames and 8 audio clips; every attribute is scored."""
    import glob

    synthetic.write_splits(str(tmp_path / "media"), str(tmp_path / "data"), num_train=4, num_test=4, progress=False)
    config = VideoLlamaConfig.preset("tiny").replace(llama=LlamaConfig.preset("tiny", vocab_size=512))
    model = InferenceModel(config, random_params(config), world["model"].tokenizer, "vicuna", num_frames=8,
                           image_size=config.vit.img_size, num_audio_clips=8)
    # The splits whose text covers every attribute (the writer also makes *_seen_* / *_heard_* views).
    shards = sorted(f for split in ("caption_test", "instruct_test")
                    for f in glob.glob(str(tmp_path / "data" / f"*-{split}.array_record-?????-of-?????")))
    assert len(shards) == 2, shards
    report = runner.run_eval(model, shards, batch_size=8, max_new_tokens=6, progress=False)
    assert len(report["examples"]) == 4 * 5 + 4
    assert all(e["media"] == ["audio", "video"] for e in report["examples"])
    qa = [e for e in report["examples"] if e["kind"] == "qa"]
    assert "<ImageHere>x12</Video> The video contains 8 frames sampled at 0.0, 0.5," in qa[0]["prompt"]
    per = report["metrics"]["attributes"]["per_attribute"]
    assert {a: p["total"] for a, p in per.items()} == {a: 4 for a in synthetic.ATTRIBUTES}
    assert all(p["majority"] == 0.25 for p in per.values())   # the writer balances every attribute
