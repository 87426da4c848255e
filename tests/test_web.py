"""vllama-web on the session's quick-demo checkpoint: the page's handlers driven in-process
(upload, streamed answers, beams, restart, bad uploads), and the page in a real Chromium through
Playwright (upload a clip, ask, read the answer, screenshot)."""
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("gradio")

from vllama_jax import web  # noqa: E402
from vllama_jax.chat import Chat  # noqa: E402

QUESTION = "What colour is the object?"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served(quick_demo):
    """What `vllama-web --demo <run>` serves: its parsed args, example clips and loaded model."""
    args, examples = web.resolve(web._parse(["--demo", quick_demo.workdir]))
    return args, examples, web.load_model(args)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from data_pipelines.media import write_image, write_mp4

    d = tmp_path_factory.mktemp("web_media")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(8, 32, 32, 3), dtype=np.uint8)
    out = {"silent": write_mp4(str(d / "silent.mp4"), frames, 4), "image": write_image(str(d / "still.jpg"), frames[0]),
           "text": str(d / "notes.txt"), "damaged": str(d / "damaged.mp4")}
    with open(out["text"], "w") as f:
        f.write("not a video\n")
    good = open(out["silent"], "rb").read()
    with open(out["damaged"], "wb") as f:   # the header of a real mp4, then noise instead of the frames
        f.write(good[:64] + rng.integers(0, 255, size=len(good), dtype=np.uint8).tobytes())
    return out


@pytest.fixture
def handlers(served):
    return web.Handlers(served[2], max_new_tokens=8)


def _drain(gen):
    return list(gen)


def _last_reply(history):
    assert history[-1]["role"] == "assistant"
    return history[-1]["content"]


def test_no_arguments_after_the_demo_serve_its_checkpoints_and_clips(quick_demo, served):
    args, examples, model = served
    runs = [os.path.join(quick_demo.workdir, "runs", n) for n in ("vision2", "audio2")]
    assert [os.path.abspath(c) for c in args.checkpoint] == [os.path.abspath(r) for r in runs]
    assert args.config.endswith("chat_config.py")
    assert examples and all(e.endswith(".mp4") and os.path.isfile(e) for e in examples)
    assert model.conv_style == "vicuna" and model.config.audio_qformer is not None
    empty = web._parse(["--demo", os.path.join(quick_demo.workdir, "nothing_here")])
    with pytest.raises(web.ChatError, match="run `vllama-demo` first"):
        web.resolve(empty)
    assert web.main(["--demo", os.path.join(quick_demo.workdir, "nothing_here")]) == 2


def test_upload_ask_streams_the_answer_then_restart(served, handlers):
    _, examples, model = served
    chat, history, box, notes = handlers.upload(None, examples[0], None, True, [])
    assert isinstance(chat, Chat) and box["interactive"] is True
    assert history[0]["role"] == "user" and "with its sound" in history[0]["content"]
    reply = _last_reply(history)
    assert reply.startswith("Received.") and "sampled at" in reply and "clips of its audio track" in reply
    assert "Vicuna" in notes and "sampled at" in notes
    assert len(chat.media) == 2                       # audio soft tokens, then the video's

    steps = _drain(handlers.ask(chat, QUESTION, history, 1, 1.0))
    answer = _last_reply(steps[-1][1])
    # Streamed: one update per generated token, the last one the recorded answer.
    assert len(steps) - (answer == web.EMPTY_ANSWER) == len(chat.last_tokens) >= 1
    assert [h["content"] for h in steps[-1][1][-2:]] == [QUESTION, answer]
    answer = "" if answer == web.EMPTY_ANSWER else answer
    assert chat.conv.messages[-1] == ["Assistant", answer]
    assert steps[-1][2]["value"] == ""
    # The same turn through Chat.answer (one jit, same seed and settings) gives the same text.
    twin = handlers.new_chat()
    twin.upload_video(examples[0], audio=True)
    twin.ask(QUESTION)
    assert twin.answer() == answer

    steps = _drain(handlers.ask(chat, "And its shape?", steps[-1][1], 3, 0.7))
    assert not _last_reply(steps[-1][1]).startswith("Error")
    assert len(chat.conv.messages) == 4

    out = handlers.restart(chat)
    assert out[0] is None and out[1] == [] and out[2]["interactive"] is False and "none yet" in out[3]


def test_bad_uploads_answer_in_the_chat_and_the_session_goes_on(served, handlers, files, tmp_path):
    _, examples, _ = served
    chat, history, _, _ = handlers.upload(None, examples[0], None, False, [])
    assert "No sound used" in _last_reply(history)

    cases = [((files["text"], None, False), "not a readable video"),
             ((files["damaged"], None, False), "not a readable video"),
             ((None, files["text"], False), "not a readable image"),
             ((examples[0], files["image"], False), "one input at a time"),
             ((None, None, True), "upload your video or image first")]
    for (video, image, audio), message in cases:
        after, history, box, _ = handlers.upload(chat, video, image, audio, history)
        assert after is chat, message                      # the conversation so far is kept
        assert _last_reply(history).startswith("Error") and message in _last_reply(history)
        assert box == {"__type__": "update"}

    big = tmp_path / "big.mp4"
    shutil.copy(examples[0], big)
    small = web.Handlers(handlers.model, max_upload_bytes=os.path.getsize(big) - 1)
    after, history, _, _ = small.upload(chat, str(big), None, False, history)
    assert after is chat and "upload limit" in _last_reply(history)

    # Audio ticked on a video without sound: the frames are used and the chat says so.
    silent, history, _, _ = handlers.upload(chat, files["silent"], None, True, history)
    assert silent is not chat and "no audio track" in _last_reply(history) and len(silent.media) == 1

    # An over-long question: a message, the question back in the box, the conversation unchanged.
    before = [list(m) for m in silent.conv.messages]
    long_question = "describe every detail of the colour and the shape " * 40
    steps = _drain(handlers.ask(silent, long_question, history, 1, 1.0))
    chat_out, history, box = steps[-1]
    assert "over this model's limit" in _last_reply(history) and box["value"] == long_question
    assert silent.conv.messages == before
    steps = _drain(handlers.ask(silent, QUESTION, history, 1, 1.0))
    assert not _last_reply(steps[-1][1]).startswith("Error")
    assert silent.conv.messages[-2][1].endswith(QUESTION)

    steps = _drain(handlers.ask(None, QUESTION, [], 1, 1.0))
    assert "upload your video or image first" in _last_reply(steps[-1][1])


def test_image_upload(served, handlers, files):
    chat, history, _, notes = handlers.upload(None, None, files["image"], False, [])
    assert _last_reply(history).startswith("Received.") and "image still.jpg" in notes
    steps = _drain(handlers.ask(chat, QUESTION, history, 2, 1.0))
    assert not _last_reply(steps[-1][1]).startswith("Error")


# ---------------------------------------------------------------------------------- in a browser

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc, port, log_path, timeout=300):
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllama-web exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"vllama-web did not answer on port {port} in {timeout} s:\n{open(log_path).read()[-3000:]}")


def test_page_answers_in_chromium(quick_demo, served, handlers, tmp_path):
    """Start vllama-web on a free local port, open it in Chromium (the distribution's package,
    driven by Playwright), upload a demo clip, ask, and read the model's answer from the page."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (CI installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    _, examples, _ = served
    clip = examples[0]
    port = _free_port()
    log_path = tmp_path / "web.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllama_jax.web", "--demo", quick_demo.workdir,
                                 "--port", str(port), "--max-new-tokens", "8"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_server(proc, port, log_path)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(240_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#video input[type=file]").set_input_files(clip)
            page.get_by_role("button", name="Upload & Start Chat").click()
            bot = page.locator("#chatbot")
            bot.get_by_text("Received.", exact=False).first.wait_for()
            box = page.locator("#question textarea")
            page.wait_for_function("() => !document.querySelector('#question textarea').disabled", polling=500)
            box.fill(QUESTION)
            box.press("Enter")
            # The answer is the bot message after the question; wait until it has text and the
            # question box was cleared (the stream ended).
            page.wait_for_function(
                """q => { const t = document.querySelector('#chatbot').innerText;
                          const i = t.lastIndexOf(q);
                          return i >= 0 && t.slice(i + q.length).trim().length > 0
                                 && document.querySelector('#question textarea').value === ''; }""",
                arg=QUESTION, polling=500)
            page.wait_for_timeout(1000)
            text = bot.inner_text()
            shot = tmp_path / "web_demo.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    answer = text[text.rindex(QUESTION) + len(QUESTION):].strip()
    assert answer and not answer.startswith("Error"), text
    # The page shows what the handlers answer in-process to the same upload and question (same
    # seed and settings; compared on letters and digits, as the page renders the text as markdown).
    chat, history, _, _ = handlers.upload(None, clip, None, True, [])
    expected = _last_reply(list(handlers.ask(chat, QUESTION, history, 1, 1.0))[-1][1])
    assert _plain(answer) == _plain(expected), (expected, text)
    assert shot.stat().st_size > 10_000
    if os.environ.get("VLLAMA_WEB_SCREENSHOT"):
        shutil.copy(shot, os.environ["VLLAMA_WEB_SCREENSHOT"])


def _plain(text: str) -> str:
    return "".join(c for c in text if c.isalnum())
