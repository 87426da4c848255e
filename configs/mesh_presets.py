"""`configs/mesh_presets.py:NAME[:ARG],TARGET`: the config `configs/NAME.py` (`get_config(ARG)`)
with TARGET's mesh and settings from `vllama_jax.mesh_presets` applied, e.g.

  vllama-train --config 'configs/mesh_presets.py:stage1_vicuna7b,v4-32' --workdir gs://...

`--config.x=y` overrides still win over the preset.
"""
import os

from vllama_jax import mesh_presets


def get_config(arg: str = ""):
    return mesh_presets.preset_config(arg, os.path.dirname(os.path.abspath(__file__)))
