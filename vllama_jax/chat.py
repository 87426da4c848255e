"""Multi-turn chat about a video, image or sound, as the reference demo runs it.

Mirrors DAMO-NLP-SG/Video-LLaMA `video_llama/conversation/conversation_video.py` (`Conversation`,
`Chat`) and `demo_audiovideo.py`:

  * the prompt text is `Conversation.get_prompt()` of `default_conversation` (Vicuna, `###`) or
    `conv_llava_llama_2` (`[INST]`), byte for byte;
  * an upload adds a human message holding `<ImageHere>` placeholders; the next question is
    appended to it (`ask`); video with audio uses the reference's two-placeholder message, audio
    soft tokens first, then video;
  * `get_context_emb`: the prompt is split at the placeholders, each piece tokenized on its own
    (BOS on the first only), embedded, and the media soft tokens put in between;
  * `answer` keeps at most `max_length` positions (prompt + new tokens), generates, strips a
    leading `<unk>` / `<s>`, decodes, cuts at the stop sign (`###` / `</s>`) and the role name, and
    stores the answer in the conversation.

Generation defaults are the reference's `Chat.answer` with HF's sampling defaults of the time
(do_sample, top_p 0.9, top_k 50, temperature 1, max_new_tokens 300), stopping on eos and, for
Vicuna, on the text `###` (the reference stops on the ids of "###" and "##"+"#").

`answer_stream` yields the answer's text as it grows, token by token (`generate.stream`);
`reply_stream` asks and streams in one go, and on any `ChatError` puts the conversation back as
it was before the question (what a web page wants). `overflow="error"` turns the reference's
silent cut of an over-long conversation into a `ChatError`.

Inputs that cannot be used (missing file, not a video, empty question...) raise `ChatError`
and leave the conversation as it was. A video without an audio track falls back to the frames
only, as the reference does, and says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.prompts import CONV_STYLES
from data_pipelines.records import IMAGE_PLACEHOLDER
from vllama_jax.cli_errors import entry_point
from vllama_jax.generate import GenerationConfig, generate, pad_prompts, stop_tables_for, stream
from vllama_jax.inference import InferenceModel
from vllama_jax.media_encoding import (MediaError, encode_media, load_audio, load_image_frames,
                                       load_video_frames)

VICUNA, LLAMA_2 = CONV_STYLES
# demo_audiovideo.py: the system text set for an image upload (a video upload clears it).
IMAGE_SYSTEM = ("You are able to understand the visual content that the user provides. "
                "Follow the instructions carefully and explain your answers in detail.")
LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                  "content that the user provides, and assist the user with a variety of tasks using "
                  "natural language.")
# Chat.upload_video with audio, including the indentation its source line continuations leave in.
AUDIO_VIDEO_MESSAGE = ("Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>. "
                       "                Close your ears, open your eyes and you see that <Video><ImageHere></Video>.  "
                       "                Now answer my question based on what you have just seen and heard.")
# Ours (the reference has no audio-only upload): the audio half of the message above.
AUDIO_MESSAGE = ("Close your eyes, open your ears and you imagine only based on the sound that: <ImageHere>. "
                 "Now answer my question based on what you have just heard.")
RECEIVED = "Received."


class ChatError(ValueError):
    """A chat input cannot be used; the conversation is unchanged."""


# ------------------------------------------------------------------------------------ conversation

@dataclasses.dataclass
class Conversation:
    """The reference `Conversation` (styles SINGLE and LLAMA_2). `messages` is a list of [role, text|None]."""
    system: str
    roles: tuple[str, str]
    messages: list = dataclasses.field(default_factory=list)
    style: str = VICUNA
    sep: str = "###"
    sep2: str | None = None

    def get_prompt(self) -> str:
        if self.style == VICUNA:
            ret = self.system + self.sep
            for role, message in self.messages:
                ret += role + ": " + message + self.sep if message else role + ":"
            return ret
        ret = ""
        for i, (role, message) in enumerate(self.messages):
            if i == 0 and (not message or role != self.roles[0]):
                raise ChatError("a Llama-2 conversation must open with a non-empty user message")
            if not message:
                continue
            if i == 0:
                message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" + message
            if i % 2 == 0:
                ret += self.sep + f"[INST] {message} [/INST]"
            else:
                ret += " " + message + " " + self.sep2
        # str.lstrip takes a character set: the reference drops the leading "<s>" this way.
        return ret.lstrip(self.sep)

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=[[r, m] for r, m in self.messages])


def new_conversation(style: str) -> Conversation:
    """`default_conversation` (vicuna) or `conv_llava_llama_2` (llama_v2) of the reference."""
    if style == VICUNA:
        return Conversation(system="", roles=("Human", "Assistant"), style=VICUNA, sep="###")
    if style == LLAMA_2:
        return Conversation(system=LLAMA_2_SYSTEM, roles=("USER", "ASSISTANT"), style=LLAMA_2, sep="<s>",
                            sep2="</s>")
    raise ChatError(f"conversation style must be {VICUNA!r} or {LLAMA_2!r}, got {style!r}")


def clean_answer(text: str, conv: Conversation) -> str:
    """The reference's post-processing of the decoded output."""
    if conv.style == VICUNA:
        return text.split("###")[0].split("Assistant:")[-1].strip()
    return text.split(conv.sep2)[0].split(conv.roles[1] + ":")[-1].strip()


# ------------------------------------------------------------------------------------ chat

def _read(load, *args):
    """A `media_encoding` loader's result; its `MediaError` as a `ChatError` (the conversation is unchanged)."""
    try:
        return load(*args)
    except MediaError as e:
        raise ChatError(str(e)) from e


def default_generation(style: str, tokenizer) -> GenerationConfig:
    eos = tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=300, do_sample=True, temperature=1.0, top_k=50, top_p=0.9,
                            repetition_penalty=1.0, eos_token_ids=() if eos is None else (int(eos),),
                            stop_strings=("###",) if style == VICUNA else (),
                            pad_token_id=int(tokenizer.pad_token_id or 0))


class Chat:
    """One conversation with a Video-LLaMA model (see the module docstring).

        chat = Chat(load_for_inference(...))
        chat.upload_video("clip.mp4")          # -> "Received."
        chat.ask("What is happening?")
        print(chat.answer())
    """

    def __init__(self, model: InferenceModel, *, generation: GenerationConfig | None = None,
                 max_length: int = 2000, seed: int = 0, bucket: int = 64, use_audio: bool = True,
                 mesh=None, log: Callable[[str], None] | None = None, overflow: str = "truncate"):
        self.model = model
        self.config = model.config
        self.params = model.params
        self.tokenizer = model.tokenizer
        self.style = model.conv_style
        self.generation = generation or default_generation(self.style, self.tokenizer)
        self.max_length = int(max_length)
        self.bucket = int(bucket)
        self.mesh = mesh
        self.use_audio = use_audio
        if overflow not in ("truncate", "error"):
            raise ValueError(f"overflow must be 'truncate' (the reference: keep the latest positions) or "
                             f"'error', got {overflow!r}")
        self.overflow = overflow
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._rng = jax.random.key(seed)
        self._turn = 0
        self._stop_tables = {}
        self.last_tokens: list[int] = []
        self.reset()

    # -- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forgets the conversation and the uploaded media."""
        self.conv = new_conversation(self.style)
        self.media: list[jax.Array] = []   # the reference's img_list: [1, K, d_llm] per placeholder
        self.media_notes: list[str] = []   # one line per upload: what was read (frame times, sound)
        self._audio_only_message = False

    @property
    def prompt(self) -> str:
        return self.conv.get_prompt()

    @property
    def has_audio_branch(self) -> bool:
        return self.config.has_audio

    # -- uploads -------------------------------------------------------------------------------

    def upload_video(self, path: str, audio: bool | None = None) -> str:
        """Frames, plus the audio track when `audio` (default: the model has an audio branch and
        `use_audio` is on)."""
        if audio and not self.has_audio_branch:
            raise ChatError("this model has no audio branch; upload the video without audio")
        use_audio = self.has_audio_branch and self.use_audio if audio is None else bool(audio)
        frames, msg, has_track = _read(load_video_frames, path, self.model.num_frames, self.model.image_size)
        fbank, why = None, "no audio track found"
        if use_audio and has_track:
            try:
                fbank = load_audio(path, self.model.num_audio_clips)
            except MediaError as e:  # the reference falls back to the frames on any audio failure too
                why = str(e)
        video = self._video_tokens(frames)
        self.conv.system = ""
        name = os.path.basename(str(path))
        if fbank is None:
            self.media.append(video)
            self.conv.append_message(self.conv.roles[0], "<Video><ImageHere></Video> " + msg)
            self.media_notes.append(f"video {name}: {msg.strip()} No sound used.")
            if use_audio:
                self.log(f"{path}: {why}; using the video frames only")
                return f"{RECEIVED} ({why}: the video frames only)"
            return RECEIVED
        self.media += [self._audio_tokens(fbank), video]
        self.conv.append_message(self.conv.roles[0], AUDIO_VIDEO_MESSAGE)
        self.media_notes.append(f"video {name}: {msg.strip()} Sound: {len(fbank)} clips of its audio track.")
        return RECEIVED

    def upload_video_without_audio(self, path: str) -> str:
        return self.upload_video(path, audio=False)

    def upload_image(self, path: str) -> str:
        """An image as a 1-frame video (the demo also sets its image system text)."""
        frames = _read(load_image_frames, path, self.model.image_size)
        self.media.append(self._video_tokens(frames))
        self.conv.system = IMAGE_SYSTEM
        self.conv.append_message(self.conv.roles[0], "<Image><ImageHere></Image> ")
        self.media_notes.append(f"image {os.path.basename(str(path))}")
        return RECEIVED

    def upload_audio(self, path: str) -> str:
        """Only the sound of a file (not in the reference: its audio half of the audio+video message)."""
        if not self.has_audio_branch:
            raise ChatError("this model has no audio branch")
        fbank = _read(load_audio, path, self.model.num_audio_clips)
        if fbank is None:
            raise ChatError(f"{str(path)!r} has no audio track")
        self.media.append(self._audio_tokens(fbank))
        self.conv.system = ""
        self.conv.append_message(self.conv.roles[0], AUDIO_MESSAGE)
        self.media_notes.append(f"sound of {os.path.basename(str(path))}: {len(fbank)} clips")
        self._audio_only_message = True
        return RECEIVED

    def _video_tokens(self, frames: np.ndarray) -> jax.Array:
        return encode_media(self.params, jnp.asarray(frames)[None], config=self.config, method="encode_video")

    def _audio_tokens(self, fbank: np.ndarray) -> jax.Array:
        return encode_media(self.params, jnp.asarray(fbank)[None], config=self.config, method="encode_audio")

    # -- turns ---------------------------------------------------------------------------------

    def ask(self, text: str) -> None:
        """Adds a question; right after an upload it joins the upload's message (reference rule)."""
        if not isinstance(text, str) or not text.strip():
            raise ChatError("the question is empty")
        msgs = self.conv.messages
        last = msgs[-1] if msgs else None
        if last is not None and last[0] == self.conv.roles[0] and last[1] is not None and (
                "</Video>" in last[1] or "</Image>" in last[1] or self._audio_only_message):
            last[1] = " ".join([last[1], text])
        else:
            self.conv.append_message(self.conv.roles[0], text)
        self._audio_only_message = False

    def context_embeds(self) -> jax.Array:
        """`get_context_emb`: [1, L, d_llm] of the prompt pieces and media soft tokens."""
        segments = self.prompt.split(IMAGE_PLACEHOLDER)
        if len(segments) != len(self.media) + 1:
            raise ChatError(f"the prompt has {len(segments) - 1} media placeholders but {len(self.media)} "
                            "media were uploaded")
        table = self.params["llama"]["embed_tokens"]["embedding"]
        dtype = self.config.llama.dtype
        parts = []
        for i, seg in enumerate(segments):
            ids = self.tokenizer(seg, add_special_tokens=i == 0)["input_ids"]
            if ids and max(ids) >= table.shape[0]:
                raise ChatError(f"the tokenizer gave id {max(ids)} but the model's vocab has {table.shape[0]} "
                                "tokens: this tokenizer does not belong to this model")
            if ids:
                parts.append(jnp.take(table, jnp.asarray(ids, jnp.int32), axis=0).astype(dtype)[None])
            if i < len(self.media):
                parts.append(self.media[i].astype(dtype))
        return jnp.concatenate(parts, axis=1)

    def answer(self, **overrides: Any) -> str:
        """Generates the assistant's reply to the pending question and records it.

        overrides: GenerationConfig fields (max_new_tokens, temperature, top_p, do_sample, num_beams...).
        """
        gen, embeds = self._open_reply(overrides)
        try:
            out = generate(**self._generate_args(embeds, gen))
        except BaseException:
            self.conv.messages.pop()
            raise
        return self._close_reply(out.rows()[0])

    def answer_stream(self, **overrides: Any) -> Iterator[str]:
        """`answer`, yielding the reply's text after every generated token (with beams, the leading
        beam's); the last yield is the recorded answer. Abandoning the iteration records nothing."""
        gen, embeds = self._open_reply(overrides)
        finished = False
        try:
            for out in stream(**self._generate_args(embeds, gen)):
                tokens = out.rows()[0]
                yield self._decode(tokens)
            finished = True
        finally:
            if not finished:
                self.conv.messages.pop()
        self._close_reply(tokens)

    def reply_stream(self, question: str, **overrides: Any) -> Iterator[str]:
        """`ask` + `answer_stream`; a `ChatError` (empty or over-long question, bad setting) leaves
        the conversation as it was before the question."""
        saved = self.conv.copy(), self._audio_only_message
        try:
            self.ask(question)
            yield from self.answer_stream(**overrides)
        except (ChatError, GeneratorExit):
            self.conv, self._audio_only_message = saved
            raise

    def _open_reply(self, overrides: dict) -> tuple[GenerationConfig, jax.Array]:
        """Opens the assistant's slot; (generation settings, context embeddings, cut to max_length)."""
        msgs = self.conv.messages
        if not msgs or msgs[-1][0] != self.conv.roles[0]:
            raise ChatError("ask a question first")
        try:
            gen = self.generation.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise ChatError(f"bad generation setting: {e}") from e
        self.conv.append_message(self.conv.roles[1], None)
        try:
            embeds = self.context_embeds()
            total = embeds.shape[1] + gen.max_new_tokens
            if total > self.max_length and self.overflow == "error":
                raise ChatError(f"the conversation is {embeds.shape[1]} positions and the answer may take "
                                f"{gen.max_new_tokens} more: over this model's limit of {self.max_length}. Ask a "
                                "shorter question or restart")
        except BaseException:
            msgs.pop()
            raise
        if total > self.max_length:
            self.log("Warning: The number of tokens in current conversation exceeds the max length. "
                     "The model will not see the contexts outside the range.")
            embeds = embeds[:, total - self.max_length:]
        return gen, embeds

    def _decode(self, tokens: list[int]) -> str:
        if tokens and tokens[0] == 0:      # a leading <unk>, as the reference strips it
            tokens = tokens[1:]
        if tokens and tokens[0] == 1:      # and a leading <s>
            tokens = tokens[1:]
        return clean_answer(self.tokenizer.decode(tokens, skip_special_tokens=False), self.conv)

    def _close_reply(self, tokens: list[int]) -> str:
        self.last_tokens = tokens
        text = self._decode(tokens)
        self.conv.messages[-1][1] = text
        return text

    def _generate_args(self, embeds: jax.Array, gen: GenerationConfig) -> dict:
        rows, mask = pad_prompts([np.asarray(embeds[0])], multiple=self.bucket, side="left")
        tables = None
        if gen.stop_strings:
            key = gen.stop_strings
            if key not in self._stop_tables:
                self._stop_tables[key] = stop_tables_for(self.tokenizer, key, self.config.llama.vocab_size)
            tables = self._stop_tables[key]
        self._turn += 1
        return dict(params=self.params["llama"], config=self.config.llama, gen=gen, inputs_embeds=jnp.asarray(rows),
                    attention_mask=jnp.asarray(mask), rng=jax.random.fold_in(self._rng, self._turn),
                    stop_tables=tables, mesh=self.mesh)


# ------------------------------------------------------------------------------------ terminal program

HELP = """commands:
  /video PATH        upload a video (with its sound when the model has an audio branch)
  /video-only PATH   upload a video, frames only
  /image PATH        upload an image
  /audio PATH        upload only the sound of a file
  /reset             start a new conversation
  /prompt            show the prompt text so far
  /help              this text
  /quit              leave (also Ctrl-D)
anything else is a question about the uploaded media"""


def run_terminal(chat: Chat, lines, out=sys.stdout) -> None:
    """The read-eval loop over `lines` (stdin or a list); every bad input prints and continues."""
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    say("Video-LLaMA chat. /help for commands.")
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if cmd in ("/quit", "/exit"):
                say("bye")
                return
            if cmd == "/help":
                say(HELP)
            elif cmd == "/reset":
                chat.reset()
                say("conversation cleared")
            elif cmd == "/prompt":
                say(chat.prompt)
            elif cmd in ("/video", "/video-only", "/image", "/audio"):
                if not arg:
                    raise ChatError(f"{cmd} needs a file path")
                upload = {"/video": chat.upload_video, "/video-only": chat.upload_video_without_audio,
                          "/image": chat.upload_image, "/audio": chat.upload_audio}[cmd]
                say(upload(arg))
            elif cmd.startswith("/"):
                raise ChatError(f"unknown command {cmd}; /help lists them")
            else:
                chat.ask(line)
                say(f"Assistant: {chat.answer()}")
        except ChatError as e:
            say(f"error: {e}")
    say("bye")


def add_model_arguments(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    """The checkpoint / config / tokenizer options `load_model` reads (vllama-chat, vllama-web)."""
    p.add_argument("--checkpoint", required=checkpoint_required, nargs="+",
                   help="trainer workdir(s) (vision run, then audio run), a `vllama-convert import` params "
                        "checkpoint, or a params .msgpack file")
    p.add_argument("--config", default=None,
                   help="trainer config file (configs/*.py) for workdirs, or a VideoLlamaConfig preset for .msgpack "
                        "(a params checkpoint names its own)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: from the config / next to the file)")
    p.add_argument("--conv-style", choices=CONV_STYLES, default=None)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")


def load_model(args: argparse.Namespace) -> InferenceModel:
    """The model `add_model_arguments`' options name (raises `inference.LoadError`)."""
    from vllama_jax.inference import load_for_inference

    return load_for_inference(args.checkpoint if len(args.checkpoint) > 1 else args.checkpoint[0],
                              args.config, tokenizer=args.tokenizer, step=args.step, conv_style=args.conv_style)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllama-chat", description="Chat with a trained Video-LLaMA about a video.")
    add_model_arguments(p)
    p.add_argument("--video", default=None, help="upload this video first")
    p.add_argument("--no-audio", action="store_true", help="never use the audio track")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(list(argv))


@entry_point("vllama-chat")
def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
    """Console entry point `vllama-chat`."""
    from vllama_jax.inference import LoadError

    args = _parse(sys.argv[1:] if argv is None else argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        model = load_model(args)
    except LoadError as e:
        print(f"vllama-chat: {e}", file=sys.stderr)
        return 2
    try:
        gen = default_generation(model.conv_style, model.tokenizer).replace(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            do_sample=not args.greedy)
    except ValueError as e:
        print(f"vllama-chat: {e}", file=sys.stderr)
        return 2
    chat = Chat(model, generation=gen, seed=args.seed, use_audio=not args.no_audio)
    if args.video:
        try:
            print(chat.upload_video(args.video), file=stdout)
        except ChatError as e:
            print(f"error: {e}", file=stdout)
    run_terminal(chat, stdin, stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
