"""One phase of an elastic-resume run of the toy config on this process' own fake CPU devices
(driven by test_elastic.py: the device count is fixed when jax starts, so each mesh size is a process).

  python tests/elastic_worker.py --devices 4 --mesh 4,1,1 --steps 6 --workdir DIR --out OUT.npz

Trains (or resumes) through `loop.train` to `--steps` and writes the logged losses, the tokens
it fed, the state it restored (if a checkpoint was there) and the final state to `--out`.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--mesh", required=True, help="(data, fsdp, tensor) mesh shape")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from elastic_phase import run_phase  # noqa: E402

    assert jax.device_count() == args.devices, jax.devices()
    run_phase(tuple(int(s) for s in args.mesh.split(",")), args.steps, args.workdir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
