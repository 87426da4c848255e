"""`vllama-convert` streams: the import writes the orbax checkpoint one tensor at a time straight
from the safetensors shards, and the HF export reads it back one tensor at a time (issue 23).
The memory bound itself is measured at 7B scale by benchmarks/convert_rss.py; here the tiny model
checks the mechanism: each tensor read once, at most two alive at once (the export: one)."""
import io
import json
import weakref

import numpy as np
import pytest

from vllama_jax.convert import cli, hf_llama, params_checkpoint
from vllama_jax.convert.params_checkpoint import LazyArray
from vllama_jax.models.llama import LlamaConfig

LLAMA = LlamaConfig.preset("tiny", vocab_size=96, num_layers=3)


@pytest.fixture
def loads(monkeypatch):
    """Counts `LazyArray.load` calls and the most loaded arrays alive at once (every tensor is
    "big" here, so the export collects garbage before each read as it does for 7B tensors)."""
    monkeypatch.setattr(params_checkpoint, "COLLECT_ABOVE_BYTES", 0)
    seen = {"loads": 0, "most_alive": 0, "names": []}
    alive: list = []
    load = LazyArray.load

    def tracked(self):
        out = load(self)
        live = sum(r() is not None for r in alive)   # others alive now that this one is made
        seen["loads"] += 1
        seen["names"].append(self.name)
        seen["most_alive"] = max(seen["most_alive"], live + 1)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(LazyArray, "load", tracked)
    return seen


def _random_hf(path, config=LLAMA):
    rng = np.random.default_rng(0)
    params = {}
    for spec in hf_llama.key_map(config).values():
        shape = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
        node = params
        for p in spec.path[:-1]:
            node = node.setdefault(p, {})
        node[spec.path[-1]] = rng.standard_normal(shape).astype(np.float16)
    # Small shards: the import reads across files.
    hf_llama.save_hf(params, config, path, max_shard_size=20_000, progress=False)
    return params


def _run(*argv):
    out = io.StringIO()
    rc = cli.main([*map(str, argv), "--no-progress"], out=out)
    return rc, out.getvalue()


def test_save_params_holds_one_lazy_tensor_at_a_time(tmp_path, loads):
    tree = {"llama": {f"layers_{i}": {"w": LazyArray((8, 4), np.float16, lambda i=i: np.full((8, 4), i, np.float16))}
                      for i in range(6)},
            "llama_proj": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    params_checkpoint.save_params(tmp_path / "ck", tree)
    assert loads["loads"] == 6 and loads["most_alive"] <= 2   # the one written, the one tensorstore may still hold
    back = params_checkpoint.load_params(tmp_path / "ck")
    assert back["llama"]["layers_4"]["w"].dtype == np.float16 and (back["llama"]["layers_4"]["w"] == 4).all()
    np.testing.assert_array_equal(back["llama_proj"]["kernel"], tree["llama_proj"]["kernel"])


def test_lazy_array_checks_what_it_loads():
    bad = LazyArray((2, 2), np.float32, lambda: np.zeros((2, 3), np.float32), "x/kernel")
    with pytest.raises(params_checkpoint.CheckpointError, match="x/kernel: loaded"):
        np.asarray(bad)
    with pytest.raises(IndexError):
        LazyArray((2, 2), np.float32, lambda: np.zeros((2, 2), np.float32))[2]


def test_import_and_hf_export_stream_one_tensor_at_a_time(tmp_path, loads):
    stored = _random_hf(tmp_path / "hf")
    assert len(json.loads((tmp_path / "hf" / hf_llama.SAFE_INDEX).read_text())["weight_map"]) == len(
        hf_llama.key_map(LLAMA))
    n = len(hf_llama.key_map(LLAMA))

    rc, out = _run("import", tmp_path / "ck", "--preset", "tiny", "--llama", tmp_path / "hf")
    assert rc == 0, out
    # Each tensor read once; tensorstore may still reference the one it wrote last (2 of 30 alive).
    assert loads["loads"] == n and loads["most_alive"] <= 2, loads
    got = params_checkpoint.load_params(tmp_path / "ck")["llama"]
    np.testing.assert_array_equal(got["layers_2"]["mlp"]["down_proj"]["kernel"],
                                  stored["layers_2"]["mlp"]["down_proj"]["kernel"])
    assert got["layers_2"]["mlp"]["down_proj"]["kernel"].dtype == np.float16

    loads.update(loads=0, most_alive=0, names=[])
    rc, out = _run("export", tmp_path / "ck", "--hf", tmp_path / "back")
    assert rc == 0, out
    # Tensors stored in several chunks are written block by block (never loaded whole); the rest
    # (here: all, the tiny tensors fit one chunk) one at a time.
    assert loads["loads"] == n and loads["most_alive"] == 1, loads
    _, again = hf_llama.load_hf(tmp_path / "back", progress=False)
    for key, spec in hf_llama.key_map(LLAMA).items():
        a, b = again, stored
        for p in spec.path:
            a, b = a[p], b[p]
        np.testing.assert_array_equal(a, b, err_msg=key)


def test_update_streams_the_kept_subtrees(tmp_path, loads):
    """--update rewrites the checkpoint: the subtrees it keeps are read back one at a time too."""
    _random_hf(tmp_path / "hf")
    assert _run("import", tmp_path / "ck", "--preset", "tiny", "--llama", tmp_path / "hf")[0] == 0
    before = params_checkpoint.load_params(tmp_path / "ck")
    loads.update(loads=0, most_alive=0, names=[])
    proj = {"llama_proj": {"kernel": np.ones((4, 4), np.float32)}}
    params_checkpoint.save_params(tmp_path / "proj", proj)
    base = params_checkpoint.lazy_params(tmp_path / "ck")
    params_checkpoint.save_params(tmp_path / "ck", {**base, **proj}, params_checkpoint.read_manifest(tmp_path / "ck"),
                                  overwrite=True)
    assert loads["most_alive"] <= 2 and loads["loads"] == len(hf_llama.key_map(LLAMA))
    after = params_checkpoint.load_params(tmp_path / "ck")
    np.testing.assert_array_equal(after["llama"]["norm"]["scale"], before["llama"]["norm"]["scale"])
    np.testing.assert_array_equal(after["llama_proj"]["kernel"], 1)


def test_blockwise_read_and_write_equal_whole_copies(tmp_path):
    """The import reads a tensor in row blocks straight into its (transposed, cast) destination and
    the export writes a transposed view in row blocks: same bytes as whole-tensor copies."""
    import io as _io

    from safetensors.numpy import save_file

    a = np.random.default_rng(1).standard_normal((37, 11)).astype(np.float16)
    save_file({"w": a}, str(tmp_path / "x.safetensors"))
    f = hf_llama._SafetensorsFile(tmp_path / "x.safetensors")
    out = np.empty((11, 37), np.float32)
    f.read_into("w", out, transpose=True, block_bytes=64)   # 64 B: 2 rows a block, 19 blocks
    np.testing.assert_array_equal(out, a.T.astype(np.float32))
    same = np.empty((37, 11), np.float16)
    f.read_into("w", same, transpose=False, block_bytes=100)
    np.testing.assert_array_equal(same, a)
    with pytest.raises(params_checkpoint.CheckpointError, match="does not fit"):
        f.read_into("w", np.empty((37, 11), np.float16), transpose=True)
    buf = _io.BytesIO()
    hf_llama._write_rows(buf, a.T, block_bytes=30)
    assert buf.getvalue() == np.ascontiguousarray(a.T).tobytes()


def test_chunked_export_reads_blocks_and_writes_the_same_bytes(tmp_path, monkeypatch, loads):
    """A params checkpoint stores each array in chunks of <= CHUNK_BYTES; the HF export of one whose
    tensors span several chunks reads them a block at a time (no whole-tensor load) and writes the
    same files, byte for byte, as the export of the same params held in memory."""
    monkeypatch.setattr(params_checkpoint, "CHUNK_BYTES", 256)   # tiny tensors: several chunks each
    stored = _random_hf(tmp_path / "hf")
    assert _run("import", tmp_path / "ck", "--preset", "tiny", "--llama", tmp_path / "hf")[0] == 0
    lazy = params_checkpoint.lazy_params(tmp_path / "ck")["llama"]
    big = lazy["layers_0"]["mlp"]["down_proj"]["kernel"]
    read = big.block_reader()
    assert read is not None
    np.testing.assert_array_equal(read((slice(None), slice(3, 9))), stored["layers_0"]["mlp"]["down_proj"]["kernel"][:, 3:9])

    loads.update(loads=0, most_alive=0, names=[])
    monkeypatch.setattr(hf_llama, "_write_blocks", _small_blocks(hf_llama._write_blocks))
    hf_llama.save_hf(lazy, LLAMA, tmp_path / "blocks", max_shard_size=20_000, progress=False)
    two_d = sum(len(s.hf_shape) == 2 for s in hf_llama.key_map(LLAMA).values())
    assert loads["loads"] == len(hf_llama.key_map(LLAMA)) - two_d, loads["names"]   # only the 1-D norms
    hf_llama.save_hf(stored, LLAMA, tmp_path / "whole", max_shard_size=20_000, progress=False)
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "blocks").iterdir())
    for name in names:
        assert (tmp_path / "blocks" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def _small_blocks(write_blocks):
    def small(f, read, shape, dt, transpose, block_bytes=16 << 20):
        return write_blocks(f, read, shape, dt, transpose, block_bytes=100)   # several blocks a tensor
    return small


def test_checkpoints_without_chunks_are_read_whole(tmp_path):
    """An array stored as one chunk (a checkpoint written before CHUNK_BYTES) has no block reader:
    each block would decode the whole tensor."""
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    params_checkpoint.save_params(tmp_path / "ck", {"w": {"kernel": a}})
    assert params_checkpoint.lazy_params(tmp_path / "ck")["w"]["kernel"].block_reader() is None
