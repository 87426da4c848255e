"""HF LLaMA checkpoint import/export: every file layout, dtypes, round trip through transformers, errors."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_reference as ref
from vllama_jax.convert.hf_llama import (CheckpointError, config_from_hf, config_to_hf, key_map,
                                         load_hf, save_hf)
from vllama_jax.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def hf_gqa():
    return ref.hf_model(seed=3, kv_heads=2)


@pytest.fixture(scope="module")
def saved(hf_gqa, tmp_path_factory):
    d = tmp_path_factory.mktemp("gqa")
    hf_gqa.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def reference_params(saved):
    return load_hf(saved, progress=False)


def _state_dict_numpy(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _assert_same_params(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in fa[0]] == [p for p, _ in fb[0]]
    for (path, x), (_, y) in zip(fa[0], fb[0]):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(path))


def test_key_map_covers_the_flax_tree_exactly():
    for tied in (False, True):
        config = LlamaConfig.preset("tiny", tie_word_embeddings=tied)
        abstract = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
        flat = {tuple(k.key for k in path): leaf.value.shape
                for path, leaf in jax.tree_util.tree_flatten_with_path(
                    abstract["params"], is_leaf=lambda x: hasattr(x, "names"))[0]}
        spec = key_map(config)
        assert {s.path for s in spec.values()} == set(flat)
        for s in spec.values():
            assert flat[s.path] == (s.hf_shape[::-1] if s.transpose else s.hf_shape)


def test_loaded_values_are_the_torch_tensors(hf_gqa, reference_params):
    config, params = reference_params
    sd = _state_dict_numpy(hf_gqa)
    layer = params["layers_1"]
    np.testing.assert_array_equal(layer["self_attn"]["k_proj"]["kernel"],
                                  sd["model.layers.1.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(layer["mlp"]["down_proj"]["kernel"], sd["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(layer["input_layernorm"]["scale"], sd["model.layers.1.input_layernorm.weight"])
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)
    assert all(isinstance(x, np.ndarray) and not isinstance(x, np.memmap) for x in jax.tree.leaves(params))


def test_sharded_safetensors_index(hf_gqa, reference_params, tmp_path):
    hf_gqa.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _assert_same_params(load_hf(tmp_path, progress=False)[1], reference_params[1])


def test_pytorch_bin_single_and_sharded(hf_gqa, saved, reference_params, tmp_path):
    import torch
    sd = hf_gqa.state_dict()
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(saved / "config.json", single)
    torch.save(sd, single / "pytorch_model.bin")
    _assert_same_params(load_hf(single, progress=False)[1], reference_params[1])

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(saved / "config.json", sharded)
    keys = list(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
             "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in parts.items():
        torch.save({k: sd[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in parts.items() for k in part}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same_params(load_hf(sharded, progress=False)[1], reference_params[1])


def test_bf16_checkpoint_and_target_dtype(hf_gqa, saved, tmp_path):
    import copy
    import torch
    bf16_model = copy.deepcopy(hf_gqa).to(torch.bfloat16)
    bf16_model.save_pretrained(tmp_path)
    _, params = load_hf(tmp_path, progress=False)
    leaf = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    expected = bf16_model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(leaf.astype(np.float32), expected)
    # cast while loading: the bf16 file to float32, the float32 file to bf16
    _, up = load_hf(tmp_path, dtype=jnp.float32, progress=False)
    assert {x.dtype for x in jax.tree.leaves(up)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(up["layers_0"]["self_attn"]["q_proj"]["kernel"], expected)
    _, down = load_hf(saved, dtype="bfloat16", progress=False)
    assert {x.dtype for x in jax.tree.leaves(down)} == {np.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(down["layers_0"]["self_attn"]["q_proj"]["kernel"], leaf)


def test_load_onto_mesh_with_shardings(saved, reference_params):
    from vllama_jax import sharding
    config = reference_params[0]
    mesh = sharding.make_mesh((2, 2, 2))
    abstract = jax.eval_shape(Llama(config).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    shardings = sharding.param_shardings(abstract, mesh)["params"]
    _, params = load_hf(saved, shardings=shardings, progress=False)
    kernel = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert isinstance(kernel, jax.Array) and tuple(kernel.sharding.spec) == ("fsdp", "tensor")
    _assert_same_params(params, reference_params[1])


@pytest.mark.parametrize("kw", [dict(kv_heads=2), dict(kv_heads=4, tied=True), dict(llama3_scaling=True)])
def test_export_loads_in_transformers_with_same_logits(kw, tmp_path, rng):
    import transformers
    config = ref.our_config(**kw)
    ids, mask = ref.padded_batch(rng)
    params = jax.tree.map(np.asarray, Llama(config).init(jax.random.key(7), jnp.asarray(ids)))["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    params = jax.tree.map(lambda x: x * 6.0 if x.ndim == 2 else x, params)  # std ~1/sqrt(fan_in)
    out_dir = save_hf(params, config, tmp_path / "export", max_shard_size="40KB", progress=False)
    assert (out_dir / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away

    hf = transformers.LlamaForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert config_from_hf(out_dir) == config
    expected = ref.hf_logits(hf, ids, mask)
    ours = Llama(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits
    assert np.abs(expected).max() > 1.0
    err = ref.max_err_on_tokens(ours, expected, mask)
    print(f"export {kw}: max abs logit err {err:.2e} (logit scale {np.abs(expected).max():.1f})")
    assert err <= 1e-4
    # and our own loader reads back exactly what was written
    _assert_same_params(load_hf(out_dir, progress=False)[1], params)


def test_export_bf16_single_file_and_overwrite(reference_params, tmp_path):
    config, params = reference_params
    out = tmp_path / "bf16"
    save_hf(params, config, out, dtype=jnp.bfloat16, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, back = load_hf(out, progress=False)
    np.testing.assert_array_equal(back["norm"]["scale"], params["norm"]["scale"].astype(jnp.bfloat16))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_hf(params, config, out, progress=False)
    save_hf(params, config, out, overwrite=True, progress=False)
    assert load_hf(out, progress=False)[1]["norm"]["scale"].dtype == np.float32


def test_config_round_trip_and_legacy_fields():
    for name in ("llama_7b", "llama2_13b", "llama3_8b", "llama3_1_8b", "tiny_llama3"):
        config = LlamaConfig.preset(name)
        assert config_from_hf(config_to_hf(config)) == config
    legacy = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-6}
    assert config_from_hf(legacy) == LlamaConfig.preset("llama_7b")
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        config_from_hf({**legacy, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="missing required field 'vocab_size'"):
        config_from_hf({k: v for k, v in legacy.items() if k != "vocab_size"})
    with pytest.raises(CheckpointError, match="model_type is 'mistral'"):
        config_from_hf({**legacy, "model_type": "mistral"})


# ---------------------------------------------------------------------------------------- errors

def _write_checkpoint(directory, hf_model, mutate):
    from safetensors.torch import save_file
    directory.mkdir()
    (directory / "config.json").write_text(hf_model.config.to_json_string())
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    mutate(sd)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_missing_tensor_is_named(hf_gqa, tmp_path):
    d = _write_checkpoint(tmp_path / "m", hf_gqa, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors .*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(d, progress=False)


def test_wrong_shape_names_tensor_expected_and_found(hf_gqa, tmp_path):
    import torch

    def widen(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    d = _write_checkpoint(tmp_path / "s", hf_gqa, widen)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: "
                                              r"expected \(32, 64\), found \(64, 64\)"):
        load_hf(d, progress=False)


def test_unexpected_keys_error_or_warn_and_inv_freq_ignored(hf_gqa, tmp_path):
    import torch

    def add(sd):
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        sd["model.extra_adapter.weight"] = torch.ones(3)
    d = _write_checkpoint(tmp_path / "u", hf_gqa, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*: model\.extra_adapter\.weight \("):
        load_hf(d, progress=False)
    with pytest.warns(UserWarning, match=r"model\.extra_adapter\.weight$"):
        _, params = load_hf(d, strict=False, progress=False)
    assert "extra_adapter" not in params


def test_missing_config_empty_dir_and_broken_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated|broken"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_hf(tmp_path)


def test_export_rejects_wrong_params(reference_params, tmp_path):
    config, params = reference_params
    bad = jax.tree.map(lambda x: x, params)
    bad["layers_0"]["mlp"]["up_proj"]["kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"layers_0/mlp/up_proj/kernel has shape \(3, 3\), expected \(64, 160\)"):
        save_hf(bad, config, tmp_path / "x", progress=False)
    del bad["layers_0"]["mlp"]["up_proj"]
    with pytest.raises(CheckpointError, match="params lack layers_0/mlp/up_proj/kernel"):
        save_hf(bad, config, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# VmHWM, not ru_maxrss: the latter survives fork+exec and would report the pytest parent's peak.
_PEAK_RSS_SCRIPT = """
import re, sys
from vllama_jax.convert.hf_llama import load_hf
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
base = hwm()
_, params = load_hf(sys.argv[1], dtype=None if sys.argv[2] == "none" else sys.argv[2], progress=False)
print(hwm() - base)
"""


@pytest.mark.slow
@pytest.mark.ci
def test_loading_streams_tensor_by_tensor(tmp_path):
    """A ~0.9 GB float32 checkpoint loads with peak RSS growth of the output plus one tensor, not 2x."""
    import subprocess
    import sys
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=12,
                         num_heads=16, num_kv_heads=16, head_dim=64)
    gen = np.random.default_rng(0)
    params = {}
    for spec in key_map(config).values():
        shape = spec.hf_shape[::-1] if spec.transpose else spec.hf_shape
        node = params
        for p in spec.path[:-1]:
            node = node.setdefault(p, {})
        node[spec.path[-1]] = gen.standard_normal(shape, dtype=np.float32)
    size = sum(x.nbytes for x in jax.tree.leaves(params))
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    save_hf(params, config, tmp_path / "ckpt", max_shard_size="300MB", progress=False)
    del params
    for dtype, out_bytes in (("none", size), ("bfloat16", size // 2)):
        grown = int(subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(tmp_path / "ckpt"), dtype],
                                   check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"dtype={dtype}: output {out_bytes / 1e9:.2f} GB, peak RSS growth {grown / 1e9:.2f} GB")
        # the output plus about one tensor in flight (its mapped file pages and its copy)
        assert grown < out_bytes + 2 * largest
