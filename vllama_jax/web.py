"""`vllama-web`: the reference's Gradio demo (`demo_audiovideo.py`) over our `chat.Chat`.

The page has the reference's controls: a video or an image upload, an "Audio" checkbox (the
video's sound goes in too), beam-search and temperature sliders, "Upload & Start Chat" and
"Restart" buttons, the chatbot with its question box, and example clips. On top of it: answers
stream in token by token, the chat template (Vicuna or Llama-2) is the checkpoint config's and
is named on the page, and what each upload read (frame times, sound clips) is shown.

All chat logic lives in `chat.Chat` (templates, uploads, `reply_stream`); `Handlers` only calls
it, turns every `ChatError` (unreadable or unsupported file, audio asked of a model without an
audio branch, an over-long question...) into a message in the chat, and keeps the session going.
`build_app` lays the page out and wires the handlers.

    vllama-web                                   # after `vllama-demo`: its checkpoints and test clips
    vllama-web --demo ./my_demo_run              # another demo work directory
    vllama-web --checkpoint RUN [RUN ...] --config CONFIG   # anything vllama-chat loads

Binds 127.0.0.1 unless --host says otherwise; uploads over --max-upload-mb are refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Iterator, Sequence

from vllama_jax.chat import LLAMA_2, Chat, ChatError, add_model_arguments, default_generation, load_model
from vllama_jax.cli_errors import entry_point
from vllama_jax.inference import InferenceModel

TITLE = "Video-LLaMA (vllama_jax)"
TEMPLATE_NAMES = {"vicuna": "Vicuna (###Human: ... ###Assistant:)", LLAMA_2: "Llama-2 ([INST] ... [/INST])"}
WAITING = "Please upload your video or image first"
EMPTY_ANSWER = "(the model's answer is empty)"
# The reference's limits for the answer window (Chat.answer: max_length 2000, max_new_tokens 300).
MAX_LENGTH, MAX_NEW_TOKENS = 2000, 300


def _gr():
    try:
        import gradio as gr
    except ImportError as e:
        raise SystemExit("vllama-web needs gradio: pip install -e '.[web]'") from e
    return gr


def _message(role: str, text: str) -> dict:
    return {"role": role, "content": text}


@dataclasses.dataclass
class Handlers:
    """The page's event handlers, callable in-process (tests) as Gradio calls them.

    Each takes the session's Chat (None before the first upload) and the components' values and
    returns the new values in the order `build_app` wires them.
    """
    model: InferenceModel
    max_upload_bytes: int = 50 * 2**20
    max_new_tokens: int | None = None
    seed: int = 0

    def __post_init__(self):
        # The answer window: what the model's positions allow, at most the reference's 2000.
        self.max_length = min(MAX_LENGTH, self.model.config.llama.max_position_embeddings)
        if self.max_new_tokens is None:
            self.max_new_tokens = min(MAX_NEW_TOKENS, self.max_length // 4)
        self.generation = default_generation(self.model.conv_style, self.model.tokenizer).replace(
            max_new_tokens=self.max_new_tokens)

    @property
    def template(self) -> str:
        return TEMPLATE_NAMES[self.model.conv_style]

    def new_chat(self) -> Chat:
        return Chat(self.model, generation=self.generation, max_length=self.max_length, seed=self.seed,
                    overflow="error", log=lambda msg: print(f"vllama-web: {msg}", file=sys.stderr))

    # -- handlers ------------------------------------------------------------------------------

    def upload(self, chat: Chat | None, video: str | None, image: str | None, audio: bool,
               history: list | None):
        """-> (chat, history, question box update, media notes). A new conversation starts with
        each upload (as the reference's); a failed upload keeps the old one."""
        gr = _gr()
        history = list(history or [])
        if video and image:
            history.append(_message("assistant", "Error: one input at a time: clear the video or the image"))
            return chat, history, gr.update(), self.notes(chat)
        path = video or image
        if not path:
            history.append(_message("assistant", f"Error: {WAITING.lower()}"))
            return chat, history, gr.update(), self.notes(chat)
        kind = "video" if video else "image"
        history.append(_message("user", f"[{kind}: {os.path.basename(path)}{' with its sound' if video and audio else ''}]"))
        fresh = self.new_chat()
        try:
            self._check_size(path)
            reply = fresh.upload_video(path, audio=bool(audio)) if video else fresh.upload_image(path)
        except ChatError as e:
            history.append(_message("assistant", f"Error: {e}"))
            return chat, history, gr.update(), self.notes(chat)
        history.append(_message("assistant", f"{reply}\n\n{fresh.media_notes[-1]}"))
        return fresh, history, gr.update(interactive=True, placeholder="Type and press Enter"), self.notes(fresh)

    def ask(self, chat: Chat | None, question: str, history: list | None, num_beams: float,
            temperature: float) -> Iterator[tuple]:
        """Streams the answer: yields (chat, history, question box) after every token; a
        ChatError ends in an error message and the question back in the box."""
        gr = _gr()
        history = list(history or [])
        if chat is None or not chat.media:
            history.append(_message("assistant", f"Error: {WAITING.lower()}"))
            yield chat, history, gr.update(value=question)
            return
        history += [_message("user", question), _message("assistant", "")]
        try:
            text = ""
            for text in chat.reply_stream(question, num_beams=int(num_beams), temperature=float(temperature)):
                history[-1] = _message("assistant", text)
                yield chat, list(history), gr.update(value="")
            if not text.strip():   # say so, rather than leave a blank bubble that looks like no answer
                history[-1] = _message("assistant", EMPTY_ANSWER)
                yield chat, list(history), gr.update(value="")
        except ChatError as e:
            history[-1] = _message("assistant", f"Error: {e}")
            yield chat, history, gr.update(value=question)

    def restart(self, chat: Chat | None):
        """-> (chat, history, question box, media notes, video, image): all cleared."""
        gr = _gr()
        return (None, [], gr.update(value="", interactive=False, placeholder=WAITING), self.notes(None),
                None, None)

    # -- helpers -------------------------------------------------------------------------------

    def _check_size(self, path: str) -> None:
        if os.path.isfile(path) and os.path.getsize(path) > self.max_upload_bytes:
            raise ChatError(f"{os.path.basename(path)} is {os.path.getsize(path) / 2**20:.1f} MiB, over the "
                            f"{self.max_upload_bytes / 2**20:.0f} MiB upload limit")

    def notes(self, chat: Chat | None) -> str:
        """The side panel: the template and what each upload of this conversation read."""
        lines = [f"**Template:** {self.template} (from the checkpoint's config)"]
        if chat is not None and chat.media_notes:
            lines += ["**Media:**"] + [f"- {n}" for n in chat.media_notes]
        else:
            lines.append("**Media:** none yet")
        return "\n\n".join(lines)


def build_app(handlers: Handlers, examples: Sequence[str] = (), description: str = ""):
    """The page: the reference's layout (media and settings on the left, the chat on the right)."""
    gr = _gr()
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"# {TITLE}\n{description}")
        chat_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                image = gr.Image(type="filepath", label="Image", sources=["upload"], elem_id="image")
                audio = gr.Checkbox(value=handlers.model.config.has_audio, label="Audio",
                                    info="use the video's sound", elem_id="audio")
                upload = gr.Button("Upload & Start Chat", variant="primary", elem_id="upload")
                restart = gr.Button("Restart", elem_id="restart")
                num_beams = gr.Slider(1, 10, value=1, step=1, label="beam search numbers", elem_id="beams")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.1, label="Temperature", elem_id="temperature")
                notes = gr.Markdown(handlers.notes(None), elem_id="media-notes")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Video-LLaMA", elem_id="chatbot", height=480)
                question = gr.Textbox(label="User", placeholder=WAITING, interactive=False, elem_id="question")
                ask = gr.Button("Send", elem_id="send")
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[video], label="Example clips")

        upload.click(handlers.upload, [chat_state, video, image, audio, chatbot],
                     [chat_state, chatbot, question, notes])
        for event in (question.submit, ask.click):
            event(handlers.ask, [chat_state, question, chatbot, num_beams, temperature],
                  [chat_state, chatbot, question])
        restart.click(handlers.restart, [chat_state], [chat_state, chatbot, question, notes, video, image])
    return app


# ------------------------------------------------------------------------------------ command line

def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllama-web", description=__doc__.split("\n\n")[0],
                                epilog="Without --checkpoint it serves the demo run in --demo.")
    add_model_arguments(p, checkpoint_required=False)
    p.add_argument("--demo", default="./vllama_demo_run",
                   help="a vllama-demo work directory: its checkpoints and test clips (when no --checkpoint)")
    p.add_argument("--examples", nargs="*", default=None, help="example clips to offer (default: the demo's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer length (default: min(300, a quarter of the model's positions))")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(list(argv))


def resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Fills the model options from the demo run when no checkpoint is given; (args, example clips)."""
    examples = list(args.examples or [])
    if not args.checkpoint:
        from vllama_jax.demo.recipe import chat_paths

        paths = chat_paths(args.demo)
        missing = [p for p in paths["checkpoint"] + [paths["config"]] if not os.path.exists(p)]
        if missing:
            raise ChatError(f"no --checkpoint given and {args.demo!r} holds no finished demo run (missing "
                            f"{', '.join(missing)}): run `vllama-demo` first or pass --checkpoint / --config")
        args.checkpoint, args.config = paths["checkpoint"], args.config or paths["config"]
        if args.examples is None:
            examples = paths["clips"][:4]
    bad = [e for e in examples if not os.path.isfile(e)]
    if bad:
        raise ChatError(f"example clips not found: {', '.join(bad)}")
    return args, examples


@entry_point("vllama-web")
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `vllama-web`."""
    from vllama_jax.inference import LoadError

    args = _parse(sys.argv[1:] if argv is None else argv)
    gr = _gr()
    try:
        args, examples = resolve(args)
        model = load_model(args)
    except (ChatError, LoadError) as e:
        print(f"vllama-web: {e}", file=sys.stderr)
        return 2
    if args.max_upload_mb <= 0:
        print("vllama-web: --max-upload-mb must be > 0", file=sys.stderr)
        return 2
    handlers = Handlers(model, max_upload_bytes=int(args.max_upload_mb * 2**20), max_new_tokens=args.max_new_tokens,
                        seed=args.seed)
    source = " ".join(args.checkpoint)
    app = build_app(handlers, examples, description=f"Checkpoint: `{source}`")
    allowed = sorted({os.path.dirname(os.path.abspath(e)) for e in examples})
    print(f"vllama-web: serving {source} on http://{args.host}:{args.port}", flush=True)
    # One generation at a time: a request waits for the one before it rather than sharing the cores.
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                  max_file_size=handlers.max_upload_bytes, allowed_paths=allowed,
                                                  show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
