"""Every console script: --help works; bad input is one line on stderr with exit 2; other errors are
one line with exit 1 unless --debug; relative paths work; torch missing names the [torch] extra."""
import importlib
import os
import sys

import numpy as np
import pytest

from train_utils import REPO
from vllama_jax import cli_errors

SCRIPTS = {
    "vllama-train": ("vllama_jax.train.cli", "main"),
    "vllama-prepare-data": ("data_pipelines.cli", "main"),
    "vllama-convert": ("vllama_jax.convert.cli", "main"),
    "vllama-chat": ("vllama_jax.chat", "main"),
    "vllama-eval": ("vllama_jax.evaluate.cli", "main"),
    "vllama-plan": ("vllama_jax.plan", "main"),
    "vllama-demo": ("vllama_jax.demo.cli", "demo_main"),
}


def _main(script):
    module, name = SCRIPTS[script]
    return getattr(importlib.import_module(module), name)


def test_setup_py_lists_exactly_these_scripts():
    text = open(os.path.join(REPO, "setup.py")).read()
    for script, (module, name) in SCRIPTS.items():
        assert f'"{script}={module}:{name}"' in text


def _call(script, argv):
    # vllama-train's argv carries the program name (absl); the argparse ones do not.
    return _main(script)([script, *argv] if script == "vllama-train" else list(argv))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_works(script, capsys):
    with pytest.raises(SystemExit) as e:
        rc = _call(script, ["--help"])
        raise SystemExit(rc)
    assert e.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower() or script == "vllama-train"


@pytest.mark.parametrize("script, argv, message", [
    ("vllama-train", ["--config", "nope.py", "--workdir", "w"], "config file 'nope.py' does not exist"),
    ("vllama-plan", ["--config", "nope.py", "--mesh", "1,1,1"], "config file 'nope.py' does not exist"),
    ("vllama-plan", ["--config", "configs/toy.py", "--mesh", "1,1,1", "--config.train.batchsize=3"],
     "config.train has no key 'batchsize' (did you mean 'batch_size'?)"),
    ("vllama-chat", ["--checkpoint", "no/such/run"], "no/such/run"),
    ("vllama-eval", ["--checkpoint", "no/such/run", "--config", "nope.py"], "'nope.py' does not exist"),
    ("vllama-convert", ["inspect", "no/such/file.pth"], "no/such/file.pth"),
    ("vllama-prepare-data", ["webvid2m", "--source", "no/such/dir", "--data-dir", "out"],
     "--source 'no/such/dir' is not a directory"),
    ("vllama-prepare-data", ["tokenizer", "--shards", "no/such/*.array_record", "--out", "tok"], "matches no file"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, script, argv, message):
    monkeypatch.chdir(REPO if any("configs/" in a for a in argv) else tmp_path)
    assert _call(script, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(script) and message in err[0], err


def test_internal_error_is_one_line_exit_1_and_debug_shows_it(capsys):
    @cli_errors.entry_point("vllama-x")
    def main(argv=None):
        raise KeyError("boom")

    assert main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vllama-x: internal error: KeyError: 'boom' (rerun with --debug for the traceback)"]
    with pytest.raises(KeyError):
        main(["--debug"])


def test_orbax_metadata_noise_is_filtered(caplog):
    import logging

    cli_errors.quiet_library_logs()
    with caplog.at_level(logging.WARNING, logger="absl"):
        logging.getLogger("absl").warning("Metadata file does not exist: /x/_CHECKPOINT_METADATA")
        logging.getLogger("absl").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


# ------------------------------------------------------------------------------ vllama-convert

@pytest.fixture(scope="module")
def tiny_params():
    """Only the LLaMA subtree (all `--hf` export reads)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from vllama_jax.models.llama import Llama, LlamaConfig

    params = Llama(LlamaConfig.preset("tiny", vocab_size=512)).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    return {"llama": jax.tree.map(np.asarray, nn.meta.unbox(params["params"]))}


def test_convert_relative_paths_and_hf_export_writes_the_tokenizer(tmp_path, monkeypatch, tiny_params, capsys):
    from data_pipelines.tokenizer import build_demo_tokenizer, load_tokenizer
    from vllama_jax.convert import hf_llama, params_checkpoint
    from vllama_jax.models.llama import LlamaConfig

    monkeypatch.chdir(tmp_path)
    tok = build_demo_tokenizer(["a red circle moving left"] * 4, "tok", vocab_size=400)
    llama = LlamaConfig.preset("tiny", vocab_size=512)
    params_checkpoint.save_params("src", tiny_params, {"preset": "tiny", "llama_config": hf_llama.config_to_hf(llama)})
    main = _main("vllama-convert")
    assert main(["export", "src", "--hf", "hf", "--tokenizer", str(tok), "--no-progress"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert len(load_tokenizer(tmp_path / "hf")) == len(load_tokenizer(tok))
    # Import back from relative paths into a relative output (orbax wants absolute ones).
    assert main(["import", "again", "--preset", "tiny", "--llama", "hf", "--no-progress"]) == 0
    back = params_checkpoint.load_params("again")
    np.testing.assert_array_equal(back["llama"]["embed_tokens"]["embedding"],
                                  tiny_params["llama"]["embed_tokens"]["embedding"])
    # Without a known tokenizer the export says how to add one.
    assert main(["export", "src", "--hf", "hf2", "--no-progress"]) == 0
    assert "no tokenizer files written to hf2: pass --tokenizer DIR" in capsys.readouterr().out


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "w.pth").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now fails as if not installed
    assert _main("vllama-convert")(["inspect", str(tmp_path / "w.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "install the [torch] extra" in err and "pip install -e '.[torch]'" in err


@pytest.mark.parametrize("files, message", [
    ({"clip.mp4": b"\x00" * 16}, "WebVid: none of ['results_2M_train.csv', 'results_2M_val.csv']"),
    ({"results_2M_train.csv": b"a,b\n1,2\n"}, "missing columns ['videoid', 'page_dir', 'name']; header is ['a', 'b']"),
])
def test_prepare_data_on_the_wrong_source_files_is_one_line(tmp_path, capsys, files, message):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    rc = _call("vllama-prepare-data", ["webvid2m", "--source", str(src), "--data-dir", str(tmp_path / "out"),
                                       "--workers", "0", "--no-progress"])
    assert rc == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("vllama-prepare-data")]
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in src.iterdir()) == sorted(files)   # the source is untouched


def test_vllama_bench_runs_from_any_directory(tmp_path, monkeypatch, capfd):
    from vllama_jax import bench

    monkeypatch.chdir(tmp_path)
    assert bench.bench_main(["--help"]) == 0
    assert "benchmarks" in capfd.readouterr().out.lower()
