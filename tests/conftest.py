"""Test setup: 8 fake CPU devices (must be set before jax is imported), float32 everywhere."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The partitionable threefry (JAX's default) makes XLA:CPU compile every parameter initializer
# 2-3x slower; param init compiles dominate many tests and no test relies on particular random
# values, so the suite uses the classic stream (also inherited by the subprocesses tests start).
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def assert_close(actual, expected, atol=1e-4, rtol=0.0, what=""):
    """Max-abs-error check that prints the error it found."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    tol = atol + rtol * float(np.max(np.abs(expected))) if expected.size else atol
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"
    return err


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One `vllama-demo --quick` run per session (~2 min on 2 cores), shared by the tests that need a
    trained demo checkpoint: .summary, .text (what it printed), .workdir, and the jax compile
    settings before and after it (.settings = (before, after))."""
    import json
    from types import SimpleNamespace

    from vllama_jax.demo import recipe

    names = ("jax_disable_most_optimizations", "jax_compilation_cache_dir")
    before = {k: jax.config.values[k] for k in names}
    workdir = tmp_path_factory.mktemp("quick_demo") / "run"
    lines = []
    summary = recipe.run_demo(str(workdir), seed=0, quick=True, workers=1, out=lines.append)
    assert json.loads((workdir / "summary.json").read_text())["seed"] == 0
    return SimpleNamespace(summary=summary, text="\n".join(lines), workdir=str(workdir),
                           settings=(before, {k: jax.config.values[k] for k in names}))
