"""`vllama-convert` end to end on tiny files: export -> import round trips, released-style and HF
sources, trainer workdirs, an import loaded by the chat, and bad inputs that must leave the destination
untouched."""
import io
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llama_reference
import video_llama_reference as vref
from vllama_jax import tree_paths
from vllama_jax.convert import cli, common, hf_llama, params_checkpoint
from vllama_jax.convert import video_llama as vl
from vllama_jax.models.llama import LlamaConfig
from vllama_jax.models.video_llama import VideoLlamaConfig

torch = vref.torch
# The tiny preset with room in the LLaMA vocab for the demo tokenizer's ids (the chat needs one).
CFG = VideoLlamaConfig.preset("tiny").replace(llama=LlamaConfig.preset("tiny", vocab_size=512))


@pytest.fixture(scope="module")
def params():
    return vref.random_params(CFG, seed=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, params):
    """Every original file of the tiny model, exported once from a params checkpoint: the Video-LLaMA
    heads, an HF LLaMA directory (with a tokenizer, as a Vicuna directory has), BLIP-2,
    imagebind_huge and eva_vit_g `.pth`s."""
    from data_pipelines.tokenizer import build_demo_tokenizer

    d = tmp_path_factory.mktemp("exported")
    src = params_checkpoint.save_params(d / "src", params, {"preset": "tiny",
                                                             "llama_config": hf_llama.config_to_hf(CFG.llama)})
    files = {"video_llama": d / "video_llama.pth", "hf": d / "hf", "blip2": d / "blip2.pth",
             "imagebind": d / "imagebind_huge.pth", "eva_vit": d / "eva_vit_g.pth"}
    rc, out = _run("export", src, "--video-llama", files["video_llama"], "--hf", files["hf"],
                   "--blip2", files["blip2"], "--imagebind", files["imagebind"], "--eva-vit", files["eva_vit"])
    assert rc == 0, out
    assert _no_leftovers(d) == []
    build_demo_tokenizer(["###Human: <Video></Video> What is in the image? ###Assistant: a red square"] * 5,
                         files["hf"], vocab_size=400)
    return files


def _run(*argv):
    out = io.StringIO()
    rc = cli.main([*map(str, argv), "--no-progress"] if argv[0] != "inspect" else list(map(str, argv)), out=out)
    return rc, out.getvalue()


def _equal_trees(a, b):
    fa, fb = tree_paths.flatten(a), tree_paths.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def _no_leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_console_script_is_registered(tmp_path):
    # Asked from another directory: a stale vllama_jax.egg-info in the repo root must not answer.
    code = ("import importlib.metadata as m; "
            "print([e.value for e in m.entry_points(group='console_scripts', name='vllama-convert')])")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['vllama_jax.convert.cli:main']", result


def test_export_then_import_every_tower_bit_exact(tmp_path, params, exported):
    files = exported
    # Each tower file has its own original layout.
    assert set(torch.load(files["blip2"], weights_only=True)) == {"model"}
    assert "blocks.0.attn.qkv.weight" in torch.load(files["eva_vit"], weights_only=True)
    assert "modality_trunks.audio.blocks.0.attn.bias_k" in torch.load(files["imagebind"], weights_only=True)

    dest = tmp_path / "imported"
    rc, out = _run("import", dest, "--preset", "tiny", "--llama", files["hf"], "--blip2", files["blip2"],
                   "--imagebind", files["imagebind"], "--video-llama", files["video_llama"])
    assert rc == 0, out
    _equal_trees(params_checkpoint.load_params(dest), params)
    meta = params_checkpoint.read_manifest(dest)
    assert meta["preset"] == "tiny" and meta["llama_config"]["hidden_size"] == CFG.llama.hidden_size
    assert meta["subtrees"]["video_qformer"] == {"source": str(files["video_llama"]), "kind": "video_llama"}
    assert meta["subtrees"]["image_encoder/qformer"]["kind"] == "blip2"
    assert meta["reports"][str(files["video_llama"])]["unmatched"] == []

    # --update swaps one subtree in place; the rest stays.
    rc, out = _run("import", dest, "--update", "--eva-vit", files["eva_vit"])
    assert rc == 0, out
    meta = params_checkpoint.read_manifest(dest)
    assert meta["subtrees"]["image_encoder/visual_encoder"]["source"] == str(files["eva_vit"])
    _equal_trees(params_checkpoint.load_params(dest), params)
    assert _no_leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def imported(tmp_path_factory, exported):
    """`vllama-convert import` of every original file of the tiny model."""
    dest = tmp_path_factory.mktemp("imported") / "ckpt"
    rc, out = _run("import", dest, "--preset", "tiny", "--llama", exported["hf"], "--blip2", exported["blip2"],
                   "--imagebind", exported["imagebind"], "--video-llama", exported["video_llama"], "--strict")
    assert rc == 0, out
    return dest


def test_imported_checkpoint_is_what_inference_loads(imported, params):
    """Nothing but the directory: the model config comes from the manifest, the tokenizer from the
    LLaMA directory it was imported from."""
    from vllama_jax.inference import load_for_inference

    model = load_for_inference(imported)
    assert model.config == CFG and model.conv_style == "vicuna"
    assert (model.num_frames, model.image_size, model.num_audio_clips) == (8, CFG.vit.img_size, 8)
    _equal_trees(model.params, params)
    assert model.tokenizer("a red square")["input_ids"]


@pytest.mark.slow
@pytest.mark.ci
def test_imported_checkpoint_chats(imported, tmp_path):
    """`vllama-chat --checkpoint DIR` on an import answers about an image (~40 s: generation compiles)."""
    from data_pipelines.media import write_image
    from vllama_jax import chat

    image = tmp_path / "square.jpg"
    write_image(str(image), np.full((32, 32, 3), 200, np.uint8))
    out = io.StringIO()
    rc = chat.main(["--checkpoint", str(imported), "--greedy", "--max-new-tokens", "2"],
                   stdin=io.StringIO(f"/image {image}\nWhat is in the image?\n/quit\n"), stdout=out)
    lines = out.getvalue().splitlines()
    assert rc == 0 and sum(l.startswith("Assistant:") for l in lines) == 1, lines
    assert not any(l.startswith("error:") for l in lines), lines


TRAIN_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_stage2.py"


@pytest.fixture(scope="module")
def trainer_import(tmp_path_factory):
    """Original files exported for the model of a trainer config, imported with `--train-config`:
    (the params they hold, the import)."""
    from vllama_jax import config_loader
    from vllama_jax.train.video_llama_task import build_task

    d = tmp_path_factory.mktemp("trainer_import")
    params = vref.random_params(build_task(config_loader.load_file(str(TRAIN_CONFIG))).config, seed=9)
    src = params_checkpoint.save_params(d / "src", params, {"train_config": str(TRAIN_CONFIG)})
    files = {"video_llama": d / "v.pth", "hf": d / "hf", "blip2": d / "b.pth"}
    rc, out = _run("export", src, *(x for k, v in files.items() for x in (f"--{k.replace('_', '-')}", v)))
    assert rc == 0, out
    dest = d / "ckpt"
    rc, out = _run("import", dest, "--train-config", TRAIN_CONFIG, "--llama", files["hf"], "--blip2", files["blip2"],
                   "--video-llama", files["video_llama"], "--strict")
    assert rc == 0, out
    return params, dest


def test_trainer_config_import_loads_with_the_trainers_layout(trainer_import, exported):
    from vllama_jax import config_loader
    from vllama_jax.inference import load_for_inference

    params, dest = trainer_import
    tc = config_loader.load_file(str(TRAIN_CONFIG))
    model = load_for_inference(dest, tokenizer=exported["hf"])
    assert (model.num_frames, model.image_size) == (tc.data.num_frames, tc.data.image_size)
    assert model.conv_style == tc.model.get("conv_style", "vicuna")
    _equal_trees(model.params, params)


def test_imported_checkpoint_starts_a_training_run(trainer_import):
    """The import named as a run's `paths.ckpt`: the trainer's pretrained hook puts every imported
    param in place of the random init."""
    from vllama_jax import config_loader
    from vllama_jax.train.video_llama_task import build_task

    params, dest = trainer_import
    config = config_loader.load_file(str(TRAIN_CONFIG))
    config.unlock()
    config.paths.ckpt = str(dest)
    task = build_task(config)
    started = task.load_pretrained(vref.random_params(task.config, seed=1))
    _equal_trees(started, params)


def test_import_released_checkpoints_and_hf_model(tmp_path):
    video = vref.heads("video", CFG.video_qformer, CFG.max_frame_pos, CFG.llama.hidden_size, seed=6)
    audio = vref.heads("audio", CFG.audio_qformer, CFG.max_audio_pos, CFG.llama.hidden_size, seed=7)
    vpath, apath = tmp_path / "vision.pth", tmp_path / "audio.pth"
    vref.released_checkpoint(vpath, [video], CFG, equip_audio=False)
    vref.released_checkpoint(apath, [audio], CFG, equip_audio=True)
    hf = llama_reference.hf_model(seed=3, kv_heads=2)
    hf.save_pretrained(tmp_path / "vicuna")

    dest = tmp_path / "ckpt"
    rc, out = _run("import", dest, "--preset", "tiny", "--llama", tmp_path / "vicuna",
                   "--video-llama", vpath, "--video-llama", apath, "--strict")
    assert rc == 0, out
    assert "ignored (2): RoPE inv_freq buffer" in out and "unmatched 0" in out
    p = params_checkpoint.load_params(dest)
    assert sorted(p) == ["audio_llama_proj", "audio_position_embedding", "audio_qformer", "llama", "llama_proj",
                         "video_frame_position_embedding", "video_qformer"]
    np.testing.assert_array_equal(p["video_qformer"]["query_tokens"], video.query_tokens.detach().numpy())
    np.testing.assert_array_equal(p["audio_llama_proj"]["kernel"], audio.proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(p["llama"]["embed_tokens"]["embedding"],
                                  hf.model.embed_tokens.weight.detach().numpy())
    # Only the requested subtrees, placed like an abstract tree says (what the chat / trainer do).
    abstract = {"llama_proj": {"kernel": jax_struct((32, 64), jnp.bfloat16), "bias": jax_struct((64,), jnp.bfloat16)}}
    got = params_checkpoint.load_params(dest, abstract=abstract)
    assert got["llama_proj"]["kernel"].dtype == jnp.bfloat16

    rc, out = _run("inspect", vpath, "--preset", "tiny")
    assert rc == 0 and "looks like: video_llama" in out
    assert "components (tiny): llama_proj, video_frame_position_embedding, video_qformer" in out
    rc, out = _run("inspect", dest)
    assert rc == 0 and "video_qformer <- " in out


def jax_struct(shape, dtype):
    import jax
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_export_from_trainer_workdir(tmp_path, params):
    from vllama_jax.checkpoint import Checkpointer
    from vllama_jax.train.step import init_state

    trainable = {k: params[k] for k in vl.BRANCHES["video"]}
    tx = optax.adamw(1e-4)
    with Checkpointer(str(tmp_path / "run"), async_save=False) as ckpt:
        state = init_state(trainable, tx, jnp.zeros(2, jnp.uint32))
        ckpt.save(state, wait=True)
        later = init_state(jax.tree.map(jnp.asarray, trainable), tx, jnp.zeros(2, jnp.uint32))
        later = later.replace(step=jnp.asarray(7, jnp.int32),
                              params={**later.params, "llama_proj": {"kernel": later.params["llama_proj"]["kernel"] + 1,
                                                                     "bias": later.params["llama_proj"]["bias"]}})
        ckpt.save(later, wait=True)
    out_pth = tmp_path / "heads.pth"
    rc, out = _run("export", tmp_path / "run", "--preset", "tiny", "--video-llama", out_pth, "--branch", "video")
    assert rc == 0, out
    sd = torch.load(out_pth, weights_only=True)["model"]
    np.testing.assert_array_equal(sd["llama_proj.weight"].numpy(), (params["llama_proj"]["kernel"] + 1).T)
    rc, out = _run("export", tmp_path / "run", "--step", 0, "--preset", "tiny", "--video-llama", out_pth,
                   "--overwrite", "--no-buffers")
    assert rc == 0, out
    sd = torch.load(out_pth, weights_only=True)["model"]
    np.testing.assert_array_equal(sd["llama_proj.weight"].numpy(), params["llama_proj"]["kernel"].T)
    assert "Qformer.bert.embeddings.position_ids" not in sd


def test_bad_inputs_are_named_and_leave_nothing_behind(tmp_path, params, capsys):
    heads = tmp_path / "heads.pth"
    vl.save_video_llama(heads, params, CFG)
    dest = tmp_path / "out"

    def fails(*argv, match):
        rc, _ = _run(*argv)
        err = capsys.readouterr().err
        assert rc == 2 and match in err, err
        assert not dest.exists() and _no_leftovers(tmp_path) == []

    data = heads.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
    fails("import", dest, "--preset", "tiny", "--video-llama", tmp_path / "truncated.pth",
          match="truncated.pth: not a readable PyTorch weights file")

    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    torch.save({"model": {}, "x": Payload()}, tmp_path / "evil.pth")
    fails("import", dest, "--preset", "tiny", "--video-llama", tmp_path / "evil.pth",
          match="evil.pth: refused: loading it needs arbitrary unpickling")

    other = {f"modality_trunks.audio.blocks.0.norm_1.{n}": np.ones(4, np.float32) for n in ("weight", "bias")}
    common.save_state_dict(tmp_path / "imagebind_huge.pth", other)
    fails("import", dest, "--preset", "tiny", "--video-llama", tmp_path / "imagebind_huge.pth",
          match="not a Video-LLaMA checkpoint for this config")

    fails("import", dest, "--preset", "tiny", "--blip2", tmp_path / "imagebind_huge.pth",
          match="(its keys look like an ImageBind checkpoint, not a BLIP-2 checkpoint)")

    sd = vl.state_dict_from_params(params, CFG)
    wide = {**sd, "audio_llama_proj.weight": np.zeros((128, 32), np.float32)}
    common.save_state_dict(tmp_path / "wide.pth", wide, wrap=True)
    fails("import", dest, "--preset", "tiny", "--video-llama", tmp_path / "wide.pth",
          match="'audio_llama_proj.weight' has shape (128, 32), expected (64, 32)")

    common.save_state_dict(tmp_path / "extra.pth", {**sd, "mystery.weight": np.zeros(3, np.float32)}, wrap=True)
    fails("import", dest, "--preset", "tiny", "--video-llama", tmp_path / "extra.pth", "--strict",
          match="1 unexpected key(s): mystery.weight")
    fails("import", dest, "--preset", "tiny", match="nothing to import")

    # Without --strict the same file imports and the stray key is reported.
    rc, out = _run("import", dest, "--preset", "tiny", "--video-llama", tmp_path / "extra.pth")
    assert rc == 0 and "unmatched: mystery.weight" in out
    before = sorted(p.name for p in dest.rglob("*"))
    rc, _ = _run("import", dest, "--preset", "tiny", "--video-llama", heads)
    assert rc == 2 and "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in dest.rglob("*")) == before

    # Export checks every requested output before writing any.
    rc, _ = _run("export", dest, "--video-llama", tmp_path / "v.pth", "--hf", tmp_path / "hf")
    assert rc == 2 and "--hf: " in capsys.readouterr().err
    assert not (tmp_path / "v.pth").exists() and not (tmp_path / "hf").exists()
