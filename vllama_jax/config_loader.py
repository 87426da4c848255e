"""Loading a python config file: the one loader every CLI and library entry point uses.

  config = config_loader.load("configs/stage1_vicuna7b.py", ["--config.optim.init_lr=1e-4"])
  config = config_loader.load("configs/mesh_presets.py:stage1_vicuna7b,v4-32")

- A spec is `path[:arg]`: the file's `get_config(arg)` (`get_config()` without `:arg`), the form
  ml_collections' `config_flags` reads, so `vllama-train --config` and `load` agree.
- Overrides are `--config.a.b=v` (or `--config.a.b v`) arguments, parsed by `config_flags` as
  `vllama-train` parses them (tuples, bools, None...).
- Every problem is a `cli_errors.UserError` naming the file or the key: a missing file, a file that
  fails to run or defines no `get_config()`, an override of a key the config does not have (with
  the closest existing key, "did you mean"), a value that does not parse.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Sequence

from vllama_jax.cli_errors import UserError, one_line, suggest

FLAG = "config"


def split_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """(file, arg) of `path[:arg]`; a path that exists as given is never split (it may hold ':')."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec, ""
    file, _, arg = spec.partition(":")
    return file, arg


def load_file(spec: str | os.PathLike):
    """`get_config([arg])` of the python config file `path[:arg]`, without overrides."""
    file, arg = split_spec(spec)
    if not os.path.isfile(file):
        raise UserError(f"config file {file!r} does not exist")
    name = f"_vllama_config_{abs(hash(os.path.abspath(file)))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module   # dataclasses look their module up while the file executes
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the file is the user's
        raise UserError(f"config file {file!r} failed to load: {type(e).__name__}: {one_line(e)}") from e
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"config file {file!r} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - as above: a bad `:arg` surfaces here
        raise UserError(f"config file {file!r}: get_config({arg!r}) failed: "
                        f"{type(e).__name__}: {one_line(e)}") from e


def override_paths(argv: Sequence[str], flag: str = FLAG) -> list[tuple[str, str]]:
    """(dotted path, the argument) of every `--config.a.b=v` / `--config.a.b v` argument."""
    prefix = f"--{flag}."
    return [(arg[len(prefix):].split("=", 1)[0], arg) for arg in argv if arg.startswith(prefix)]


def overridden(argv: Sequence[str], flag: str = FLAG) -> tuple[str, ...]:
    """The dotted config paths that `--config.a.b=v` arguments set (presets leave them alone)."""
    return tuple(path for path, _ in override_paths(argv, flag))


def check_override_keys(config, argv: Sequence[str], flag: str = FLAG) -> None:
    """Raises UserError naming the first `--config.x.y` whose key the config does not have."""
    for path, arg in override_paths(argv, flag):
        node, walked = config, []
        for key in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                where = f"{flag}.{'.'.join(walked)}" if walked else flag
                if not keys:
                    raise UserError(f"{arg}: {where} is a value ({type(node).__name__}), it has no field {key!r}")
                raise UserError(f"{arg}: {where} has no key {key!r}{suggest(key, keys)}")
            node, walked = node[key], walked + [key]


def define_flag(flag_values, argv: Sequence[str], flag: str = FLAG) -> None:
    """Defines `--config` (file + overrides) on an absl FlagValues bound to `argv`: config_flags
    finds the overrides in the argv it is defined with, so each parse gets its own FlagValues."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(flag, None, "config file (python, defines get_config; 'path:arg' "
                                    "passes arg)", flag_values=flag_values, lock_config=True,
                                    sys_argv=list(argv))


def parse_flags(flag_values, argv: Sequence[str], spec: str | None, flag: str = FLAG):
    """Parses `argv` (argv[0] the program) with `flag_values` (`define_flag` done), checking the
    config file and the override keys first, so each problem is one UserError rather than
    config_flags' own trace; returns the loaded config with the overrides applied (None when no
    `--config` was given)."""
    from absl import flags

    if spec is not None:
        check_override_keys(load_file(spec), argv[1:], flag)
    try:
        flag_values(list(argv))
    except flags.Error as e:
        raise UserError(one_line(e)) from None
    if flag_values[flag].value is None:
        return None
    try:
        config = getattr(flag_values, flag)
        config.keys()   # a file that failed to load raises here
    except (OSError, AttributeError, KeyError, ValueError, TypeError) as e:
        raise UserError(f"--{flag} {spec}: {one_line(e)}") from e
    return config


def load(spec: str | os.PathLike, overrides: Sequence[str] = (), prog: str = "vllama"):
    """The config of `path[:arg]` with `--config.a.b=v` overrides applied as `vllama-train` does."""
    from absl import flags

    spec = os.fspath(spec)
    argv = [prog, f"--{FLAG}={spec}", *overrides]
    fv = flags.FlagValues()
    define_flag(fv, argv)
    return parse_flags(fv, argv, spec)


def resolve(config: Any):
    """A config object as is, or a spec (`path[:arg]`, str or PathLike) loaded with `load_file`."""
    if isinstance(config, (str, os.PathLike)):
        return load_file(config)
    return config
