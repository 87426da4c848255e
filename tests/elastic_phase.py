"""One phase of an elastic-resume toy run (shared by test_elastic.py in-process and elastic_worker.py)."""
from __future__ import annotations

import jax
import numpy as np

from train_utils import to_numpy, toy_config_dict
from vllama_jax import sharding
from vllama_jax.checkpoint import Checkpointer
from vllama_jax.train import loop, partition, toy


class Recorder:
    """Passes the toy iterator through, keeping the tokens of each batch it hands out."""

    def __init__(self, it):
        self.it, self.tokens = it, []
        self.state_is_global = it.state_is_global

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.tokens.append(batch["tokens"])
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def flat_state(state) -> dict:
    d = to_numpy(state.to_dict())
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(d)[0]}


def run_phase(mesh_shape, steps: int, workdir: str, out: str | None = None, devices=None) -> dict:
    """Trains (or resumes) the toy config to `steps` on a mesh of `mesh_shape`; returns (and
    writes to `out`) losses, tokens fed, the restored state (if any) and the final state."""
    config = toy_config_dict(total_steps=steps, log_every=1, save_every=0)
    n = int(np.prod(mesh_shape))
    mesh = sharding.make_mesh(mesh_shape, devices=(devices or jax.devices())[:n])
    task = toy.build_task(config)
    result = {}
    with Checkpointer(workdir) as ck:
        if ck.latest_step() is not None:
            su = loop._setup(config, task, mesh)
            restored = ck.restore(su.abstract_state, trainable_paths=su.paths)
            result.update({f"restored/{k}": v for k, v in flat_state(restored).items()})
            leaf = restored.params["head"]["Dense_0"]["kernel"]
            assert leaf.sharding.mesh.devices.size == n, leaf.sharding
    it = Recorder(toy.build_train_iter(config))
    r = loop.train(config, task, it, workdir=workdir, mesh=mesh)
    result.update({f"final/{k}": v for k, v in flat_state(r.state).items()})
    result["losses"] = np.asarray([h["loss"] for h in r.history], np.float64)
    result["tokens"] = np.stack(it.tokens)
    if out:
        np.savez(out, **result)
    return result
