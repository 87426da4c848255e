"""grain loader: fixed shapes, masks, truncation, resumable state, process sharding, mixing, errors."""
import dataclasses

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import loader, packing
from data_pipelines import prompts
from data_pipelines.records import encode_example, encode_jpeg, make_example
from data_pipelines.shards import WRITER_OPTIONS
from data_pipelines.tokenizer import TextEncoder, TokenizerError, build_demo_tokenizer, load_tokenizer

CFG = loader.LoaderConfig.preset("tiny")  # B=2, L=48, T=4, 32x32 frames, 4 media tokens
X = prompts.IGNORE_INDEX


def _jpeg(rng, h=20, w=24):
    return encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def caption_example(i, rng, media="video", caption=None, audio=False):
    n = 8 if media == "video" else 1
    fbank = rng.standard_normal((8, 1, 128, 204)).astype(np.float16) if audio else None
    return make_example(id=f"cap/{i}", media=media, frames=[_jpeg(rng) for _ in range(n)], kind="caption",
                        caption=caption or f"Clip number {i}.", frame_times=np.arange(n) * 0.5,
                        fbank=fbank, audio_present=audio, duration_s=4.0 if media == "video" else 0.0)


def conv_example(i, rng, media="image"):
    n = 8 if media == "video" else 1
    turns = [{"from": "human", "value": ("<image>\n" if media == "image" else "<video> ") + f"What is {i}?"},
             {"from": "gpt", "value": f"It is {i}."}]
    return make_example(id=f"conv/{i}", media=media, frames=[_jpeg(rng) for _ in range(n)],
                        kind="conversation", conversations=turns, frame_times=np.arange(n) * 0.5)


def write_shards(path_prefix, examples, num_shards=2):
    paths = [f"{path_prefix}-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
    writers = [ArrayRecordWriter(p, WRITER_OPTIONS) for p in paths]
    for i, ex in enumerate(examples):
        writers[i % num_shards].write(ex if isinstance(ex, bytes) else encode_example(ex))
    for w in writers:
        w.close()
    return paths


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    texts = [f"clip number {i} what is {i} it is {i}" for i in range(50)]
    texts += [prompts.VICUNA_CAPTION_TEMPLATE, "The video contains frames sampled at seconds."]
    out = build_demo_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=500)
    return TextEncoder(load_tokenizer(out))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("shards")
    caps = [caption_example(i, rng, media="video" if i % 3 else "image", audio=i % 4 == 0) for i in range(24)]
    convs = [conv_example(i, rng, media="image" if i % 2 else "video") for i in range(8)]
    return {"caption": write_shards(str(d / "cap"), caps), "conv": write_shards(str(d / "conv"), convs)}


def _ids(batches):
    return [str(i) for b in batches for i in b["example_id"]]


def test_batch_shapes_masks_and_padding(shards, encoder):
    cfg = dataclasses.replace(CFG, batch_size=4, keep_ids=True, num_epochs=1)
    specs = [loader.DatasetSpec(shards["caption"], weight=1.0), loader.DatasetSpec(shards["conv"], weight=1.0)]
    batches = list(loader.make_loader(specs, cfg, encoder, 0, 1))
    assert len(batches) == 4  # mixing stops when the 8 conversations run out: 8 + 8 rows
    spec = loader.batch_spec(cfg)
    for b in batches:
        for k, (shape, dtype) in spec.items():
            assert b[k].shape == shape and b[k].dtype == dtype, k
        mm = b["media_mask"]
        np.testing.assert_array_equal(mm.sum(1), cfg.num_media_tokens)
        assert (b["input_ids"][mm] == 0).all()
        assert (b["targets"][mm] == X).all()
        assert (b["targets"][b["attention_mask"] == 0] == X).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == encoder.pad_id).all()
        assert (b["input_ids"][:, 0] == encoder.bos_id).all() and (b["targets"][:, 0] == X).all()
        for r, eid in enumerate(b["example_id"]):
            n = b["attention_mask"][r].sum()
            assert b["attention_mask"][r, :n].all()  # real tokens first, then padding
            n_labels = int((b["targets"][r] != X).sum())
            assert n_labels > 0
            image = eid.startswith("cap/") and int(eid.split("/")[1]) % 3 == 0 or \
                eid.startswith("conv/") and int(eid.split("/")[1]) % 2 == 1
            assert b["frame_mask"][r].tolist() == ([True] + [False] * 3 if image else [True] * 4), eid
            assert not b["frames"][r][~b["frame_mask"][r]].any()
            assert b["audio_mask"][r] == (eid.startswith("cap/") and int(eid.split("/")[1]) % 4 == 0)
            assert b["audio"][r].any() == b["audio_mask"][r]
        assert np.isfinite(b["frames"]).all() and abs(float(b["frames"].mean())) < 3


def test_caption_row_matches_prompt_builder(shards, encoder):
    """A stage-1 caption row is exactly [bos] + media + caption ids + '\\n', then padding."""
    cfg = dataclasses.replace(CFG, batch_size=1, keep_ids=True, shuffle=False, num_epochs=1, train=False)
    b = next(loader.make_loader(loader.DatasetSpec(shards["caption"][:1]), cfg, encoder, 0, 1))
    i = int(str(b["example_id"][0]).split("/")[1])
    text = encoder(f"clip number {i}\n", add_bos=False)
    n = 1 + cfg.num_media_tokens + len(text)
    assert b["input_ids"][0, :n].tolist() == [encoder.bos_id] + [0] * cfg.num_media_tokens + text
    assert b["targets"][0].tolist() == [X] * (1 + cfg.num_media_tokens) + text + [X] * (cfg.seq_len - n)
    assert b["attention_mask"][0].tolist() == [1] * n + [0] * (cfg.seq_len - n)


def test_max_txt_len_truncates_caption(tmp_path, encoder):
    rng = np.random.default_rng(1)
    long = " ".join(["clip number"] * 30)
    paths = write_shards(str(tmp_path / "long"), [caption_example(0, rng, caption=long)], num_shards=1)
    cfg = dataclasses.replace(CFG, batch_size=1, max_txt_len=7, num_epochs=1)
    b = next(loader.make_loader(paths, cfg, encoder, 0, 1))
    labels = b["targets"][0][b["targets"][0] != X]
    assert len(labels) == 7
    assert labels.tolist() == encoder(long + "\n", add_bos=False)[:7]
    assert b["attention_mask"][0].sum() == 1 + cfg.num_media_tokens + 7


def test_conversation_targets_vicuna_and_llama2(shards, encoder):
    for style in ("vicuna", "llama_v2"):
        cfg = dataclasses.replace(CFG, batch_size=8, seq_len=160, conv_style=style, num_epochs=1, keep_ids=True)
        b = next(loader.make_loader(loader.DatasetSpec(shards["conv"]), cfg, encoder, 0, 1))
        for r, eid in enumerate(b["example_id"]):
            i = eid.split("/")[1]
            labels = b["targets"][r][b["targets"][r] != X].tolist()
            answer = encoder(f"It is {i}.", add_bos=False)
            decoded = encoder.decode(labels)
            assert f"It is {i}." in decoded, (style, decoded)
            assert f"What is {i}" not in decoded, (style, decoded)  # the question is never a target
            if style == "vicuna":
                assert decoded.rstrip().endswith("###")  # the reference trains the closing ###
            else:
                assert labels[-1] == encoder.tokenizer.eos_token_id and len(labels) >= len(answer)


def test_video_conversation_time_message(shards, encoder):
    cfg = dataclasses.replace(CFG, batch_size=8, seq_len=160, num_epochs=1, keep_ids=True, shuffle=False)
    b = next(loader.make_loader(loader.DatasetSpec(shards["conv"]), cfg, encoder, 0, 1))
    for r, eid in enumerate(b["example_id"]):
        text = encoder.decode(b["input_ids"][r][b["attention_mask"][r] == 1])
        is_video = int(eid.split("/")[1]) % 2 == 0
        # 8 stored frames 0.5 s apart, uniform 4 of them: indices 0,2,4,6
        assert ("The video contains 4 frames sampled at 0.0, 1.0, 2.0, 3.0 seconds." in text) == is_video, text


def test_state_restore_yields_exactly_the_remaining_examples(shards, encoder):
    cfg = dataclasses.replace(CFG, keep_ids=True, num_epochs=1)
    spec = loader.DatasetSpec(shards["caption"])
    it = loader.make_loader(spec, cfg, encoder, 0, 1)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = list(it)
    assert len(first) + len(rest) == 12
    resumed = loader.make_loader(spec, cfg, encoder, 0, 1)
    resumed.set_state(state)
    again = list(resumed)
    assert _ids(again) == _ids(rest)
    for a, b in zip(rest, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # same crops, frames, prompts
    assert sorted(_ids(first) + _ids(rest)) == sorted(f"cap/{i}" for i in range(24))


def test_epochs_are_reshuffled(shards, encoder):
    cfg = dataclasses.replace(CFG, batch_size=4, keep_ids=True, num_epochs=2)
    ids = _ids(loader.make_loader(loader.DatasetSpec(shards["conv"]), cfg, encoder, 0, 1))
    e1, e2 = ids[:8], ids[8:]
    assert sorted(e1) == sorted(e2) == sorted(f"conv/{i}" for i in range(8))
    assert e1 != e2
    same_seed = _ids(loader.make_loader(loader.DatasetSpec(shards["conv"]), cfg, encoder, 0, 1))
    assert same_seed == ids
    other_seed = _ids(loader.make_loader(loader.DatasetSpec(shards["conv"]), dataclasses.replace(cfg, seed=1),
                                         encoder, 0, 1))
    assert other_seed != ids


def test_two_processes_see_disjoint_shards_covering_the_data(shards, encoder):
    cfg = dataclasses.replace(CFG, keep_ids=True, num_epochs=1)
    seen = [set(_ids(loader.make_loader(loader.DatasetSpec(shards["caption"]), cfg, encoder, p, 2))) for p in range(2)]
    assert len(seen[0]) == len(seen[1]) == 12
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"cap/{i}" for i in range(24)}
    # 24 records over 5 processes: equal shards of 4, the 4 left over are dropped
    sizes = [len(_ids(loader.make_loader(loader.DatasetSpec(shards["caption"]), dataclasses.replace(cfg, batch_size=1),
                                         encoder, p, 5))) for p in range(5)]
    assert sizes == [4] * 5


def test_mixing_weights_are_respected(shards, encoder):
    cfg = dataclasses.replace(CFG, batch_size=8, keep_ids=True, seq_len=160)
    specs = [loader.DatasetSpec(shards["caption"], weight=3.0), loader.DatasetSpec(shards["conv"], weight=1.0)]
    it = loader.make_loader(specs, cfg, encoder, 0, 1)
    ids = _ids(next(it) for _ in range(30))  # 240 draws, several epochs of the conversations
    frac = sum(i.startswith("cap/") for i in ids) / len(ids)
    assert abs(frac - 0.75) < 0.03, frac
    assert len({i for i in ids if i.startswith("conv/")}) == 8


def test_missing_shard_and_tokenizer_errors(tmp_path, encoder):
    with pytest.raises(loader.LoaderError, match="nothere.array_record.*does not exist"):
        loader.make_loader(str(tmp_path / "nothere.array_record"), CFG, encoder, 0, 1)
    with pytest.raises(loader.LoaderError, match="matches no file"):
        loader.make_loader(str(tmp_path / "none-*.array_record"), CFG, encoder, 0, 1)
    (tmp_path / "junk.array_record").write_bytes(b"this is not an array record file" * 10)
    with pytest.raises(loader.LoaderError, match="junk.array_record.*not a readable ArrayRecord"):
        loader.make_loader(str(tmp_path / "junk.array_record"), CFG, encoder, 0, 1)
    with pytest.raises(TokenizerError, match="no_tokenizer_here"):
        load_tokenizer(tmp_path / "no_tokenizer_here")


def test_corrupt_record_names_the_record(tmp_path, encoder):
    rng = np.random.default_rng(2)
    paths = write_shards(str(tmp_path / "bad"), [caption_example(0, rng), b"\x93garbage"], num_shards=1)
    cfg = dataclasses.replace(CFG, batch_size=1, shuffle=False, num_epochs=1)
    it = loader.make_loader(paths, cfg, encoder, 0, 1)
    next(it)
    with pytest.raises(loader.LoaderError, match=r"bad-00000-of-00001.array_record\[1\]"):
        next(it)


def test_seq_len_too_short_for_the_prompt_names_the_record(shards, encoder):
    cfg = dataclasses.replace(CFG, seq_len=3, num_epochs=1)
    with pytest.raises(loader.LoaderError, match=r"record 'cap/\d+'.*media tokens"):
        next(loader.make_loader(loader.DatasetSpec(shards["caption"]), cfg, encoder, 0, 1))


def test_build_train_iter_from_trainer_config(shards, encoder, tmp_path):
    import ml_collections

    encoder.tokenizer.save_pretrained(tmp_path / "tok")
    c = ml_collections.ConfigDict()
    c.paths = ml_collections.ConfigDict({"tokenizer": str(tmp_path / "tok"), "llama_model": "",
                                         "prompt_path": "prompts/alignment_image.txt"})
    c.model = ml_collections.ConfigDict({"max_txt_len": 16, "end_sym": "###", "conv_style": "vicuna",
                                         "prompt_template": prompts.VICUNA_CAPTION_TEMPLATE})
    c.train = ml_collections.ConfigDict({"batch_size": 4, "seed": 3})
    shard_dir = shards["caption"][0].rsplit("/", 1)[0]
    c.data = ml_collections.ConfigDict({
        "datasets": {"cap": 100, "conv": -1}, "shards": f"{shard_dir}/{{name}}-*.array_record",
        "num_frames": 4, "image_size": 32, "num_audio_clips": 8, "seq_len": 0, "num_query_placeholders": 4})
    cfg = loader.loader_config_from(c)
    assert cfg.seq_len == 72 and cfg.caption_prompts == prompts.ALIGNMENT_IMAGE_PROMPTS and cfg.batch_size == 4
    specs = loader._dataset_specs(c.data)
    assert [(s.name, s.weight) for s in specs] == [("cap", 100.0), ("conv", 8.0)]
    it = loader.build_train_iter(c)
    b = next(it)
    assert b["input_ids"].shape == (4, 72) and b["frames"].shape == (4, 4, 32, 32, 3)
    np.testing.assert_array_equal(b["media_mask"].sum(1), 4)
    assert isinstance(it.get_state(), dict)
    text = encoder.decode(b["input_ids"][0][b["attention_mask"][0] == 1])
    assert "###Assistant:" in text  # stage-2 caption prompt or a vicuna conversation
    c.paths.prompt_path = str(tmp_path / "missing_prompts.txt")
    with pytest.raises(loader.LoaderError, match="missing_prompts.txt"):
        loader.loader_config_from(c)


def _stop_and_resume(spec, cfg, encoder, num_first: int):
    """(the first batches, the rest of the epoch, the rest again from a loader restored to the state
    saved after the first ones): what the worker-process resume tests compare."""
    it = loader.make_loader(spec, cfg, encoder, 0, 1)
    first = [next(it) for _ in range(num_first)]
    state = it.get_state()
    rest = list(it)
    it.close()
    resumed = loader.make_loader(spec, cfg, encoder, 0, 1)
    resumed.set_state(state)
    again = list(resumed)
    resumed.close()
    return first, rest, again


@pytest.mark.slow
@pytest.mark.ci
def test_worker_processes_resume_exactly(shards, encoder):
    """mp_prefetch (2 worker processes): state restore replays the remaining batches (~30 s here)."""
    cfg = dataclasses.replace(CFG, keep_ids=True, num_epochs=1, worker_count=2)
    first, rest, again = _stop_and_resume(loader.DatasetSpec(shards["caption"]), cfg, encoder, 3)
    assert _ids(again) == _ids(rest)
    assert sorted(_ids(first) + _ids(rest)) == sorted(f"cap/{i}" for i in range(24))


def _packed_ids(batches):
    return [str(i) for b in batches for i in b["example_id"][b["example_mask"]]]


def test_packed_batches_hold_the_unpacked_rows(shards, encoder):
    """pack=True: every example's tokens and media land in its row slot, segment ids apart, none lost."""
    base = dataclasses.replace(CFG, keep_ids=True, num_epochs=1, seq_len=160, shuffle=False)
    spec = loader.DatasetSpec(shards["conv"])
    rows = {str(r): b for b in loader.make_loader(spec, dataclasses.replace(base, batch_size=1), encoder, 0, 1)
            for r in b["example_id"]}
    # 47-72 tokens each: two or three to a row
    assert max(int(b["attention_mask"].sum()) for b in rows.values()) < 80
    cfg = dataclasses.replace(base, pack=True, media_per_batch=6, batch_size=2, drop_remainder=False)
    batches = list(loader.make_loader(spec, cfg, encoder, 0, 1))
    assert sorted(_packed_ids(batches)) == sorted(rows) and len(rows) == 8
    assert len(batches) < 4   # 8 examples in fewer than the 4 padded batches of 2
    spec_shapes = loader.batch_spec(cfg)
    for b in batches:
        for k, (shape, dtype) in spec_shapes.items():
            assert b[k].shape == shape and b[k].dtype == dtype, k
        slot = packing.slot_of_segments(b["segment_ids"])
        assert sorted(slot.values()) == list(np.flatnonzero(b["example_mask"]))
        for r in range(cfg.batch_size):
            start = 0
            for j in range(1, int(b["segment_ids"][r].max()) + 1):
                one = rows[str(b["example_id"][slot[r, j]])]
                n = int(one["attention_mask"][0].sum())
                assert (b["segment_ids"][r, start:start + n] == j).all()
                for k in ("input_ids", "attention_mask", "targets", "media_mask"):
                    np.testing.assert_array_equal(b[k][r, start:start + n], one[k][0, :n], err_msg=k)
                for k in ("frames", "frame_mask", "audio", "audio_mask"):
                    np.testing.assert_array_equal(b[k][slot[r, j]], one[k][0], err_msg=k)
                start += n
            assert (b["segment_ids"][r, start:] == 0).all() and (b["attention_mask"][r, start:] == 0).all()
            assert (b["targets"][r, start:] == X).all()


def test_packed_iterator_state_restores_exactly(shards, encoder):
    """Captions (10-11 tokens) and conversations (47-72) into rows of 100: examples are held back
    for later batches and emitted out of order; a restore from any batch boundary replays exactly."""
    cfg = dataclasses.replace(CFG, keep_ids=True, num_epochs=1, seq_len=100, pack=True, media_per_batch=6,
                              drop_remainder=False)
    specs = [loader.DatasetSpec(shards["caption"], weight=1.0), loader.DatasetSpec(shards["conv"], weight=1.0)]
    full = list(loader.make_loader(specs, cfg, encoder, 0, 1))
    ids = _packed_ids(full)
    assert len(ids) == len(set(ids)) == 16   # mixing stops when the 8 conversations run out
    skips = []
    for k in range(1, len(full)):
        it = loader.make_loader(specs, cfg, encoder, 0, 1)
        for _ in range(k):
            next(it)
        state = it.get_state()
        skips.append(len(state["skip"]))
        resumed = loader.make_loader(specs, cfg, encoder, 0, 1)
        resumed.set_state(state)
        again = list(resumed)
        assert len(again) == len(full) - k and _packed_ids(again) == _packed_ids(full[k:])
        for a, b in zip(full[k:], again):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(skips), "no restore point had examples held back: the test does not exercise the skip state"


@pytest.mark.slow
def test_packed_worker_processes_resume_exactly(shards, encoder):
    """pack=True under mp_prefetch (2 worker processes): the packer pickles into the workers and
    a restore replays the remaining packed batches (~30 s here)."""
    cfg = dataclasses.replace(CFG, keep_ids=True, num_epochs=1, seq_len=100, pack=True, media_per_batch=6,
                              worker_count=2)
    first, rest, again = _stop_and_resume(loader.DatasetSpec(shards["caption"]), cfg, encoder, 2)
    assert len(rest) > 0 and _packed_ids(again) == _packed_ids(rest)
    assert len(set(_packed_ids(first) + _packed_ids(rest))) == len(_packed_ids(first) + _packed_ids(rest))
