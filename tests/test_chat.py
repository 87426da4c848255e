"""Chat: reference prompt templates by hand, audio-first media, answers vs direct generation, bad
inputs, the terminal loop with piped stdin, and loading for inference (msgpack, trainer workdir)."""
import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from media_fixtures import damaged_files
from vllama_jax.chat import IMAGE_SYSTEM, Chat, ChatError, clean_answer, default_generation, main, new_conversation
from vllama_jax.generate import GenerationConfig, generate
from vllama_jax.inference import InferenceModel, LoadError, load_for_inference, save_params_msgpack
from vllama_jax.models.llama import LlamaConfig
from vllama_jax.models.video_llama import VideoLlama, VideoLlamaConfig, init_params

# The reference's upload_video message with audio, typed out by hand (16 spaces of indentation
# survive each backslash line continuation of its source).
REF_AUDIO_VIDEO = ("Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>. "
                   + " " * 16 + "Close your ears, open your eyes and you see that <Video><ImageHere></Video>.  "
                   + " " * 16 + "Now answer my question based on what you have just seen and heard.")
CONFIG_FILE = '''
from vllama_jax.models.llama import LlamaConfig
from vllama_jax.models.video_llama import VideoLlamaConfig

def get_config():
    return VideoLlamaConfig.preset("tiny").replace(llama=LlamaConfig.preset("tiny", vocab_size=512),
                                                   max_frame_pos=4, max_audio_pos=2)
'''


def random_params(config: VideoLlamaConfig, seed: int = 0) -> dict:
    """Random params of the right tree and shapes without compiling the init (which takes ~30 s
    on CPU): N(0, 0.05) kernels and embeddings, norm scales near 1."""
    abstract = jax.eval_shape(lambda r: init_params(config, r)["params"], jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "weight" in name:
            return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)
        return (0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def tiny_config() -> VideoLlamaConfig:
    # The demo tokenizer needs more ids than the tiny LLaMA's 256. Same as CONFIG_FILE, so the
    # terminal test reuses the compiled programs (the loader picks 4 frames and 2 clips from it).
    return VideoLlamaConfig.preset("tiny").replace(llama=LlamaConfig.preset("tiny", vocab_size=512),
                                                   max_frame_pos=4, max_audio_pos=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, tiny model params and media files on disk."""
    from data_pipelines.media import write_image, write_mp4
    from data_pipelines.tokenizer import build_demo_tokenizer, load_tokenizer

    d = tmp_path_factory.mktemp("chat")
    corpus = ["###Human: <Video></Video> What colour is the object? ###Assistant: red",
              "[INST] <<SYS>> You are able to understand the visual content [/INST] a blue square </s>",
              "Close your eyes, open your ears and you imagine only based on the sound that"] * 10
    tok_dir = build_demo_tokenizer(corpus, d / "tokenizer", vocab_size=420)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(8, 32, 32, 3), dtype=np.uint8)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
    files = {"av": str(d / "av.mp4"), "silent": str(d / "silent.mp4"), "image": str(d / "img.jpg"),
             "text": str(d / "notes.txt"), "missing": str(d / "nope.mp4")}
    write_mp4(files["av"], frames, 4, tone, 16000)
    write_mp4(files["silent"], frames, 4)
    write_image(files["image"], frames[0])
    with open(files["text"], "w") as f:
        f.write("not a video at all\n")
    config = tiny_config()
    params = random_params(config)
    return {"dir": d, "tok_dir": str(tok_dir), "tokenizer": load_tokenizer(tok_dir), "files": files,
            "config": config, "params": params}


def make_chat(world, style="vicuna", **kw) -> Chat:
    model = InferenceModel(world["config"], world["params"], world["tokenizer"], style, num_frames=4,
                           image_size=world["config"].vit.img_size, num_audio_clips=2)
    gen = default_generation(style, world["tokenizer"]).replace(do_sample=False, max_new_tokens=6)
    return Chat(model, generation=gen, log=lambda msg: None, **kw)


# ---------------------------------------------------------------------------------- templates

def test_vicuna_turns_follow_the_reference_template(world):
    chat = make_chat(world)
    assert chat.upload_video(world["files"]["av"]) == "Received."
    chat.ask("What is the sound?")
    assert chat.prompt == "###Human: " + REF_AUDIO_VIDEO + " What is the sound?###"
    answer = chat.answer()
    assert chat.conv.messages[-1] == ["Assistant", answer]
    chat.conv.messages[-1][1] = None   # what the model saw: the reply slot opened, not yet filled
    assert chat.prompt == "###Human: " + REF_AUDIO_VIDEO + " What is the sound?###Assistant:"
    chat.conv.messages[-1][1] = "a low tone"   # a fixed reply keeps the expected text exact
    chat.ask("And the colour?")
    assert chat.prompt == ("###Human: " + REF_AUDIO_VIDEO + " What is the sound?###Assistant: a low tone"
                           "###Human: And the colour?###")
    chat.reset()
    assert chat.prompt == "###" and chat.media == []


def test_video_only_and_image_messages(world):
    chat = make_chat(world)
    chat.upload_video_without_audio(world["files"]["av"])
    chat.ask("Describe it.")
    msg = "The video contains 4 frames sampled at 0.0, 0.5, 1.0, 1.5 seconds. "
    assert chat.prompt == f"###Human: <Video><ImageHere></Video> {msg} Describe it.###"
    chat = make_chat(world)
    chat.upload_image(world["files"]["image"])
    chat.ask("What is it?")
    assert chat.prompt == (IMAGE_SYSTEM + "###Human: <Image><ImageHere></Image>  What is it?###")


def test_llama2_turns_follow_the_reference_template(world):
    chat = make_chat(world, style="llama_v2")
    chat.upload_image(world["files"]["image"])
    chat.ask("What is it?")
    sys_block = ("<<SYS>>\nYou are able to understand the visual content that the user provides. Follow the "
                 "instructions carefully and explain your answers in detail.\n<</SYS>>\n\n")
    first = f"[INST] {sys_block}<Image><ImageHere></Image>  What is it? [/INST]"
    assert chat.prompt == first
    chat.answer()
    chat.conv.messages[-1][1] = "a square"
    chat.ask("Which colour?")
    assert chat.prompt == first + " a square </s><s>[INST] Which colour? [/INST]"
    # The reference's fresh llama-2 conversation (before the demo changes the system text).
    conv = new_conversation("llama_v2")
    conv.append_message("USER", "hi")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == ("[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able "
                                 "to understand the visual content that the user provides, and assist the user "
                                 "with a variety of tasks using natural language.\n<</SYS>>\n\nhi [/INST]")


def test_clean_answer_as_the_reference():
    vicuna, llama = new_conversation("vicuna"), new_conversation("llama_v2")
    assert clean_answer(" Assistant: a red ball.\n###Human: more", vicuna) == "a red ball."
    assert clean_answer("It moves left ##", vicuna) == "It moves left ##"
    assert clean_answer("ASSISTANT: a cat </s> junk", llama) == "a cat"


# ---------------------------------------------------------------------------------- media + answers

def test_audio_tokens_come_first_and_context_is_assembled_by_segments(world):
    from data_pipelines.audio import load_audio_clips
    from data_pipelines.video import decode_video, normalize

    chat = make_chat(world)
    chat.upload_video(world["files"]["av"])
    chat.ask("Hi")
    config, params, tok = world["config"], world["params"], world["tokenizer"]
    model = VideoLlama(config)
    fbank = load_audio_clips(world["files"]["av"], num_clips=2).fbank
    size = (config.vit.img_size, config.vit.img_size)  # scaled while decoding, as decord does
    frames = normalize(decode_video(world["files"]["av"], 4, size=size).frames)
    audio = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VideoLlama.encode_audio))(
        params, jnp.asarray(fbank)[None])
    video = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VideoLlama.encode_video))(
        params, jnp.asarray(frames)[None])
    assert [m.shape[1] for m in chat.media] == [config.num_audio_tokens, config.num_video_tokens]
    np.testing.assert_allclose(np.asarray(chat.media[0]), np.asarray(audio), atol=1e-5)
    np.testing.assert_allclose(np.asarray(chat.media[1]), np.asarray(video), atol=1e-5)

    seg = chat.prompt.split("<ImageHere>")
    ids = [tok(s, add_special_tokens=i == 0)["input_ids"] for i, s in enumerate(seg)]
    assert ids[0][0] == tok.bos_token_id and tok.bos_token_id not in ids[1] + ids[2]
    table = params["llama"]["embed_tokens"]["embedding"]
    expected = jnp.concatenate([table[jnp.asarray(ids[0])], audio[0], table[jnp.asarray(ids[1])], video[0],
                                table[jnp.asarray(ids[2])]], axis=0)
    np.testing.assert_allclose(np.asarray(chat.context_embeds()[0]), np.asarray(expected), atol=1e-6)


def test_answer_is_greedy_generation_on_the_context(world):
    chat = make_chat(world)
    chat.upload_video_without_audio(world["files"]["av"])
    chat.ask("What colour is the object?")
    text = chat.answer()
    chat.conv.messages[-1][1] = None      # the context the reply was generated from
    embeds = chat.context_embeds()
    chat.conv.messages[-1][1] = text
    gen = GenerationConfig(max_new_tokens=6, eos_token_ids=(2,), stop_strings=("###",))
    direct = generate(world["params"]["llama"], world["config"].llama, gen, inputs_embeds=embeds,
                      stop_tables=chat._stop_tables[("###",)])
    assert chat.last_tokens == direct.rows()[0]
    toks = chat.last_tokens[1:] if chat.last_tokens[:1] == [0] else chat.last_tokens
    toks = toks[1:] if toks[:1] == [1] else toks
    assert text == clean_answer(world["tokenizer"].decode(toks), chat.conv)
    assert chat.conv.messages[-1] == ["Assistant", text]


def test_max_length_keeps_the_latest_positions(world):
    warnings = []
    chat = make_chat(world)
    chat.log = warnings.append
    chat.max_length = 20
    chat.upload_video_without_audio(world["files"]["av"])
    chat.ask("What colour is the object?")
    assert chat.context_embeds().shape[1] + 6 > 20
    chat.answer()
    assert any("exceeds the max length" in w for w in warnings)


def test_streamed_answer_is_the_answer_and_errors_roll_back(world):
    f = world["files"]

    def started(**kw):
        chat = make_chat(world, **kw)
        chat.upload_video_without_audio(f["av"])
        return chat
    chat, twin = started(), started()
    assert chat.media_notes == ["video av.mp4: The video contains 4 frames sampled at 0.0, 0.5, 1.0, 1.5 "
                                "seconds. No sound used."]
    chat.ask("What colour is the object?")
    texts = list(chat.answer_stream(num_beams=2))
    twin.ask("What colour is the object?")
    assert texts[-1] == twin.answer(num_beams=2)
    assert chat.conv.messages == twin.conv.messages and chat.last_tokens == twin.last_tokens
    assert len(texts) == len(chat.last_tokens)
    # An abandoned stream records no answer.
    chat.ask("And the shape?")
    it = chat.answer_stream()
    next(it)
    it.close()
    assert chat.conv.messages[-1] == ["Human", "And the shape?"]
    # overflow="error": an over-long turn is refused and reply_stream puts the conversation back.
    chat = started(overflow="error")
    chat.max_length = 20
    before = [list(m) for m in chat.conv.messages]
    with pytest.raises(ChatError, match="over this model's limit of 20"):
        list(chat.reply_stream("What colour is the object?"))
    assert chat.conv.messages == before
    with pytest.raises(ChatError, match="empty"):
        list(chat.reply_stream("  "))
    assert chat.conv.messages == before
    with pytest.raises(ValueError, match="overflow"):
        make_chat(world, overflow="drop")


# ---------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_give_clear_errors_and_keep_the_session(world):
    f = world["files"]
    chat = make_chat(world)
    with pytest.raises(ChatError, match="ask a question first"):
        chat.answer()
    for call, pattern in [(lambda: chat.upload_video(f["missing"]), "does not exist"),
                          (lambda: chat.upload_video(f["text"]), "not a readable video"),
                          (lambda: chat.upload_image(f["text"]), "not a readable image"),
                          (lambda: chat.upload_audio(f["silent"]), "has no audio track"),
                          (lambda: chat.upload_video(str(world["dir"])), "is a directory"),
                          (lambda: chat.ask("   "), "empty")]:
        with pytest.raises(ChatError, match=pattern):
            call()
        assert chat.conv.messages == [] and chat.media == []
    # Damaged files: the error names the file and what was expected; nothing is added.
    damaged = damaged_files(world["dir"] / "damaged")
    for call, pattern in [(lambda: chat.upload_video(damaged["cut"]),
                           r"cut\.mp4' is not a readable video \(truncated: decoded \d\.\d s of 5\.3 s"),
                          (lambda: chat.upload_video(damaged["corrupt"]), r"corrupt\.mp4.*decode error mid-stream"),
                          (lambda: chat.upload_video(damaged["empty"]), r"empty\.mp4.*empty file \(0 bytes\)"),
                          (lambda: chat.upload_audio(damaged["cut"]), r"cut\.mp4.*(truncated|decode error)")]:
        with pytest.raises(ChatError, match=pattern):
            call()
        assert chat.conv.messages == [] and chat.media == []
    # A video without sound falls back to its frames, says so, and the chat goes on.
    reply = chat.upload_video(f["silent"])
    assert "no audio track" in reply
    assert chat.conv.messages == [["Human", "<Video><ImageHere></Video> The video contains 4 frames sampled at "
                                             "0.0, 0.5, 1.0, 1.5 seconds. "]]
    assert len(chat.media) == 1
    with pytest.raises(ChatError, match="bad generation setting"):
        chat.ask("Q?") or chat.answer(top_p=2.0)
    assert chat.conv.messages[-1][0] == "Human"       # the failed answer left no empty reply behind
    assert isinstance(chat.answer(), str)


def test_terminal_loop_with_piped_stdin(world, tmp_path):
    f = world["files"]
    params_file = save_params_msgpack(world["params"], tmp_path / "params.msgpack")
    config_file = tmp_path / "tiny_chat_config.py"
    config_file.write_text(CONFIG_FILE)
    script = "\n".join([f"/video {f['missing']}", f"/video {f['text']}", "/video", "/bogus",
                        f"/video {f['silent']}", "What colour is the object?", "/prompt", "/reset",
                        "/prompt", f"/audio {f['av']}", "How fast does it beep?", "/quit",
                        "never read"]) + "\n"
    out = io.StringIO()
    rc = main(["--checkpoint", str(params_file), "--config", str(config_file), "--tokenizer", world["tok_dir"],
               "--greedy", "--max-new-tokens", "4"], stdin=io.StringIO(script), stdout=out)
    lines = out.getvalue().splitlines()
    assert rc == 0
    assert any(l.startswith("error:") and "does not exist" in l for l in lines)
    assert any(l.startswith("error:") and "not a readable video" in l for l in lines)
    assert any("/video needs a file path" in l for l in lines)
    assert any("unknown command /bogus" in l for l in lines)
    assert any("no audio track" in l for l in lines)
    assert sum(l.startswith("Assistant:") for l in lines) == 2
    assert "###Human: <Video><ImageHere></Video> The video contains 4 frames" in out.getvalue()
    assert "###" in lines   # the prompt right after /reset
    assert lines[-1] == "bye" and "never read" not in out.getvalue()


# ---------------------------------------------------------------------------------- loading

def test_load_for_inference_errors(world, tmp_path):
    bad = dict(world["params"])
    bad["llama_proj"] = {"kernel": np.zeros((3, 3), np.float32), "bias": np.zeros((3,), np.float32)}
    path = save_params_msgpack(bad, tmp_path / "bad.msgpack")
    with pytest.raises(LoadError, match=r"wrong shape llama_proj/bias: \(3,\) != \(64,\), llama_proj/kernel"):
        load_for_inference(path, tiny_config(), tokenizer=world["tok_dir"])
    with pytest.raises(LoadError, match="does not exist"):
        load_for_inference(tmp_path / "none.msgpack", tiny_config(), tokenizer=world["tok_dir"])
    with pytest.raises(LoadError, match="neither a .msgpack file nor a trainer workdir"):
        load_for_inference(tmp_path / "nothing", "configs/tiny_stage2.py")
    (tmp_path / "broken.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(LoadError, match="not a flax msgpack"):
        load_for_inference(tmp_path / "broken.msgpack", tiny_config(), tokenizer=world["tok_dir"])
    with pytest.raises(LoadError, match="unknown VideoLlamaConfig preset"):
        load_for_inference(path, "tinyy", tokenizer=world["tok_dir"])


def test_load_for_inference_from_a_trainer_workdir(world, tmp_path):
    """A workdir written through the trainer's Checkpointer: trained params of the newest step
    over the saved frozen params; the model config and media layout come from the trainer config."""
    import optax
    from vllama_jax.checkpoint import Checkpointer
    from vllama_jax import config_loader
    from vllama_jax.train import partition
    from vllama_jax.train.step import init_state
    from vllama_jax.train.video_llama_task import build_task

    config = config_loader.load_file(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_stage2.py"))
    config.unlock()
    config.paths.tokenizer = world["tok_dir"]
    task = build_task(config)
    params = random_params(task.config, seed=3)
    trainable, frozen = partition.split(params, task.trainable_patterns())
    tx = optax.adamw(1e-3)
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        for step, shift in ((2, 1.0), (5, 2.0)):
            moved = jax.tree.map(lambda x: x + shift, trainable)
            state = init_state(moved, tx, jnp.zeros((2,), jnp.uint32)).replace(step=jnp.int32(step))
            ckpt.save(state, trainable_paths=partition.flatten(moved).keys(), wait=True)
        ckpt.save_frozen(frozen)
    model = load_for_inference(str(tmp_path), config)
    assert model.config == task.config and model.conv_style == "vicuna"
    assert (model.num_frames, model.image_size, model.num_audio_clips) == (2, 28, 8)
    expected = partition.merge(jax.tree.map(lambda x: x + 2.0, trainable), frozen)
    got, want = partition.flatten(model.params), partition.flatten(expected)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    older = load_for_inference(str(tmp_path), config, step=2)
    np.testing.assert_array_equal(partition.flatten(older.params)["llama_proj/bias"],
                                  partition.flatten(trainable)["llama_proj/bias"] + 1.0)
    with pytest.raises(LoadError, match="no checkpoint for step 7"):
        load_for_inference(str(tmp_path), config, step=7)
