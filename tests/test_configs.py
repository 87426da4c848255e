"""Config files: reference hyper-parameters, tower preset names, command-line overrides."""
import os

import pytest

from train_utils import REPO
from vllama_jax.train import cli, loop
from vllama_jax.train.task import build_task, trainable_patterns

CONFIGS = ["stage1_vicuna7b", "stage2_vicuna7b", "stage1_llama2_7b", "stage2_llama2_7b",
           "audio_branch", "tiny_stage1", "tiny_stage2", "toy"]


def _load(name, *overrides, arg=""):
    path = os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else "")
    config, workdir, _ = cli.parse(["vllama-train", "--config", path, "--workdir", "/tmp/unused", *overrides])
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_resolves(name):
    c = _load(name)
    assert loop.total_steps(c) > 0
    assert trainable_patterns(c, build_task(c))
    assert ":" in c.task.builder and ":" in c.data.train_builder


@pytest.mark.parametrize("name,lr,min_lr,warmup,ipe,epochs,batch,txt", [
    ("stage1_vicuna7b", 1e-4, 8e-5, 2500, 2500, 5, 256, 32),
    ("stage2_vicuna7b", 3e-5, 1e-5, 1000, 1000, 3, 32, 320),
    ("stage1_llama2_7b", 1e-4, 8e-5, 2500, 2500, 5, 256, 32),
    ("stage2_llama2_7b", 3e-5, 1e-5, 1000, 1000, 3, 32, 320),
])
def test_vision_stage_reference_hyperparameters(name, lr, min_lr, warmup, ipe, epochs, batch, txt):
    c = _load(name)
    o = c.optim
    assert (o.init_lr, o.min_lr, o.warmup_lr, o.weight_decay) == (lr, min_lr, 1e-6, 0.05)
    assert (o.warmup_steps, o.iters_per_epoch, o.max_epoch) == (warmup, ipe, epochs)
    assert (o.b1, o.b2, o.lr_sched) == (0.9, 0.999, "linear_warmup_cosine_lr")
    assert c.train.batch_size == batch and c.model.max_txt_len == txt
    assert c.data.num_frames == 8 and c.data.image_size == 224
    assert c.model.train_branch == "vision" and not c.model.equip_audio_branch
    if "llama2" in name:
        assert c.model.llama == "llama2_7b" and c.model.prompt_template.startswith("[INST] <<SYS>>")
        assert c.model.end_sym == "</s>"
    else:
        assert c.model.llama == "llama_7b" and c.model.prompt_template == "###Human: {} ###Assistant: "
    expected_data = {"webvid", "cc_sbu_align"} if "stage1" in name else \
        {"cc_sbu_align", "llava_instruct", "webvid_instruct"}
    assert set(c.data.datasets.keys()) == expected_data


def test_audio_branch_stages():
    s1, s2 = _load("audio_branch"), _load("audio_branch", arg="2")
    assert (s1.optim.warmup_steps, s1.optim.iters_per_epoch, s1.optim.max_epoch) == (5000, 5000, 5)
    assert (s2.optim.init_lr, s2.optim.min_lr, s2.optim.warmup_steps) == (3e-5, 1e-5, 400)
    assert s2.model.max_txt_len == 512
    for c in (s1, s2):
        assert c.model.train_branch == "audio" and c.model.equip_audio_branch
        assert c.data.num_query_placeholders == 8
    llama2 = _load("audio_branch", arg="2,llama2_7b")
    assert llama2.model.llama == "llama2_7b"


@pytest.mark.parametrize("module,field,names", [
    ("vllama_jax.models.llama", "PRESETS", ("llama",)),
    ("vllama_jax.models.vit", "PRESETS", ("vit",)),
    ("vllama_jax.models.qformer", "PRESETS", ("qformer", "video_qformer", "audio_qformer")),
    ("vllama_jax.models.imagebind", "AUDIO_PRESETS", ("imagebind_audio",)),
    ("vllama_jax.models.imagebind", "VISION_PRESETS", ("imagebind_vision",)),
])
def test_tower_presets_exist(module, field, names):
    mod = pytest.importorskip(module)
    table = getattr(mod, field)
    for config_name in ("stage1_vicuna7b", "stage2_llama2_7b", "tiny_stage1"):
        c = _load(config_name)
        for n in names:
            assert c.model[n] in table, f"{config_name}: model.{n}={c.model[n]!r} not in {module}.{field}"


def test_tiny_configs_are_small():
    c = _load("tiny_stage1")
    assert c.model.llama == "tiny" and c.model.vit == "tiny" and c.train.batch_size == 8
    assert c.train.compute_dtype == "float32" and loop.total_steps(c) == 10


def test_command_line_overrides():
    c = _load("stage1_vicuna7b", "--config.optim.init_lr=3e-4", "--config.mesh.shape=(2,2,2)",
              "--config.model.train_branch=audio", "--config.train.accum_steps=4",
              "--config.data.dataset_shards.webvid=/data/webvid-*.array_record")
    assert c.optim.init_lr == 3e-4 and tuple(c.mesh.shape) == (2, 2, 2)
    assert c.data.dataset_shards.webvid == "/data/webvid-*.array_record"
    assert c.model.train_branch == "audio" and c.train.accum_steps == 4
    with pytest.raises(Exception, match="init_lrr"):
        _load("stage1_vicuna7b", "--config.optim.init_lrr=1")
    with pytest.raises(Exception, match="init_lr"):
        _load("stage1_vicuna7b", "--config.optim.init_lr=fast")


def test_cli_reports_usage_errors(capsys):
    assert cli.main(["vllama-train", "--workdir", "/tmp/x"]) == 2
    assert "--config is required" in capsys.readouterr().err
    assert cli.main(["vllama-train", "--config", os.path.join(REPO, "configs", "nope.py"),
                     "--workdir", "/tmp/x"]) == 2
    assert "nope.py" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny_stage1", "tiny_stage2", "stage2_llama2_7b", "audio_branch"])
def test_data_loader_reads_the_configs(name):
    loader = pytest.importorskip("data_pipelines.loader")
    c = _load(name)
    lc = loader.loader_config_from(c)
    assert lc.num_frames == c.data.num_frames and lc.max_txt_len == c.model.max_txt_len
    assert lc.num_media_tokens == c.data.num_query_placeholders


def test_dtype_fields_parse_with_none_for_unset():
    import jax.numpy as jnp

    from vllama_jax.train import config_lib

    assert config_lib.dtype_of("bfloat16") == jnp.bfloat16
    assert config_lib.dtype_of("float32") == jnp.float32
    assert all(config_lib.dtype_of(v) is None for v in (None, "", "none", "None"))
    with pytest.raises(TypeError):
        config_lib.dtype_of("float33")
