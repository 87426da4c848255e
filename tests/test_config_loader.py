"""config_loader: `path[:arg]`, `--config.x=y` overrides, the mesh-presets config file, and one
UserError naming the file or key for each kind of bad input."""
import os
import textwrap

import ml_collections
import pytest

from vllama_jax import config_loader, mesh_presets
from vllama_jax.cli_errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(textwrap.dedent("""
        import ml_collections

        def get_config(arg="plain"):
            c = ml_collections.ConfigDict()
            c.name = arg
            c.train = ml_collections.ConfigDict({"batch_size": 4, "shape": (1, 2)})
            return c
    """))
    return str(path)


def test_path_arg_and_overrides(config_file):
    assert config_loader.load_file(config_file).name == "plain"
    assert config_loader.load_file(f"{config_file}:other").name == "other"
    c = config_loader.load(f"{config_file}:x", ["--config.train.batch_size=8", "--config.train.shape=(3,4)"])
    assert (c.name, c.train.batch_size, tuple(c.train.shape)) == ("x", 8, (3, 4))
    assert config_loader.overridden(["--config.train.batch_size=8", "--workdir=w"]) == ("train.batch_size",)


def test_resolve_passes_objects_through(config_file):
    obj = ml_collections.ConfigDict({"a": 1})
    assert config_loader.resolve(obj) is obj
    assert config_loader.resolve(config_file).name == "plain"


@pytest.mark.parametrize("body, spec_tail, overrides, message", [
    (None, "", [], r"config file '.*nope\.py' does not exist"),
    ("x = 1\n", "", [], r"defines no get_config\(\)"),
    ("raise RuntimeError('boom')\n", "", [], r"failed to load: RuntimeError: boom"),
    ("def get_config(arg):\n    raise ValueError('bad arg ' + arg)\n", ":zz", [], r"get_config\('zz'\) failed: ValueError: bad arg zz"),
    ("FILE", "", ["--config.train.batchsize=3"], r"config.train has no key 'batchsize' \(did you mean 'batch_size'\?\)"),
    ("FILE", "", ["--config.name.x=3"], r"config.name is a value \(str\), it has no field 'x'"),
    ("FILE", "", ["--config.train.batch_size=many"], r"batch_size"),
])
def test_bad_input_is_a_user_error(tmp_path, config_file, body, spec_tail, overrides, message):
    if body == "FILE":
        path = config_file
    else:
        path = str(tmp_path / "nope.py")
        if body is not None:
            with open(path, "w") as f:
                f.write(body)
    with pytest.raises(UserError, match=message):
        config_loader.load(path + spec_tail, overrides)


def test_mesh_presets_config_file_applies_the_target():
    c = config_loader.load(os.path.join(CONFIGS, "mesh_presets.py") + ":stage1_vicuna7b,v4-32",
                           ["--config.model.remat=False"])
    assert tuple(c.mesh.shape) == mesh_presets.MESHES[("v4-32", "7b", 1)]
    assert c.model.remat is False   # the override wins over the preset's setting
    assert config_loader.load(os.path.join(CONFIGS, "mesh_presets.py") + ":stage1_vicuna7b,v4-32").model.remat
    with pytest.raises(UserError, match="unknown target 'v9-9'"):
        config_loader.load_file(os.path.join(CONFIGS, "mesh_presets.py") + ":stage1_vicuna7b,v9-9")
    with pytest.raises(UserError, match="expected 'configs/mesh_presets.py:CONFIG_NAME,TARGET'"):
        config_loader.load_file(os.path.join(CONFIGS, "mesh_presets.py") + ":stage1_vicuna7b")
    with pytest.raises(UserError, match="no_such_config.py' does not exist"):
        config_loader.load_file(os.path.join(CONFIGS, "mesh_presets.py") + ":no_such_config,v4-32")
