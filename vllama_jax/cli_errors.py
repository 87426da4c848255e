"""What every console script does with an error: one line a person can act on, and an exit code.

  @cli_errors.entry_point("vllama-foo")
  def main(argv=None) -> int: ...

- `UserError` (and the exception types in `USER_ERRORS`: missing files, bad shards, bad
  tokenizers, bad checkpoints, bad config keys) print `prog: error: <message>` and exit 2.
- Any other exception prints `prog: internal error: <Type>: <message> (rerun with --debug for the
  traceback)` and exits 1: a bug, not something the user typed.
- `--debug` anywhere on the command line (or `VLLAMA_DEBUG=1`) re-raises instead, with the
  traceback; the flag is removed before the CLI's own parser sees it.
- Ctrl-C exits 130 with one line.
- Library log lines that tell a user nothing (`LOG_NOISE`, e.g. orbax's "Metadata file does not
  exist" for every checkpoint it reads) are dropped.

`suggest` names the closest of several choices ("did you mean"); config files and their
`--config.a.b=v` overrides are `vllama_jax.config_loader`'s.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
from typing import Callable, Iterable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "VLLAMA_DEBUG"
USAGE_EXIT = 2


# Messages of library loggers (absl carries orbax's) that are expected and not actionable.
LOG_NOISE = ("Metadata file does not exist",)


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in LOG_NOISE)


def quiet_library_logs() -> None:
    """Drops LOG_NOISE from the absl logger (idempotent)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _NoiseFilter) for f in logger.filters):
        logger.addFilter(_NoiseFilter())


class UserError(Exception):
    """A problem the user can fix (a bad value, a missing file, a mismatch between inputs)."""


def _user_error_types() -> tuple[type, ...]:
    """Exception types that describe the user's input, not a bug; imported lazily so this module
    stays cheap to import."""
    types: list[type] = [UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                         PermissionError, FileExistsError]
    for module, name in (("data_pipelines.loader", "LoaderError"),
                         ("data_pipelines.tokenizer", "TokenizerError"),
                         ("vllama_jax.convert.common", "CheckpointError"),
                         ("vllama_jax.checkpoint", "CheckpointDamagedError"),
                         ("vllama_jax.checkpoint", "WorkdirLockedError"),
                         ("vllama_jax.inference", "LoadError"),
                         ("vllama_jax.evaluate.metrics", "EvalError"),
                         ("vllama_jax.media_encoding", "MediaError"),
                         ("vllama_jax.chat", "ChatError"),
                         ("vllama_jax.plan", "PlanError"),
                         ("vllama_jax.convert.cli", "UsageError"),
                         ("data_pipelines.prompts", "PromptError"),
                         ("data_pipelines.records", "RecordError"),
                         ("data_pipelines.video", "MediaDecodeError"),
                         ("data_pipelines.audio", "AudioDecodeError")):
        mod = sys.modules.get(module)   # only what the CLI already imported can have been raised
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return tuple(types)


def one_line(message: object) -> str:
    """The message with its whitespace (newlines included) collapsed."""
    return " ".join(str(message).split())


def _describe(e: BaseException) -> str:
    text = one_line(e)
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return text or type(e).__name__


def strip_debug(argv: Sequence[str] | None) -> tuple[list[str] | None, bool]:
    """(argv without --debug, whether it was there). argv None means sys.argv, edited in place."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if argv is None:
        if DEBUG_FLAG in sys.argv:
            sys.argv[:] = [a for a in sys.argv if a != DEBUG_FLAG]
            debug = True
        return None, debug
    argv = list(argv)
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        debug = True
    return argv, debug


def entry_point(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wraps a console script's `main(argv=None, ...)` as the module doc says."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: Sequence[str] | None = None, *args, **kwargs) -> int:
            argv, debug = strip_debug(argv)
            quiet_library_logs()
            try:
                return main(argv, *args, **kwargs)
            except KeyboardInterrupt:
                if debug:
                    raise
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            except Exception as e:  # noqa: BLE001 - the point of this wrapper
                if debug:
                    raise
                if isinstance(e, _user_error_types()):
                    print(f"{prog}: error: {_describe(e)}", file=sys.stderr)
                    return USAGE_EXIT
                print(f"{prog}: internal error: {type(e).__name__}: {_describe(e)} "
                      f"(rerun with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
                return 1

        wrapped.unwrapped = main
        return wrapped

    return wrap


# ------------------------------------------------------------------------------ suggestions

def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
