"""`vllama-plan`: will a training config fit a target? Answered on this machine, before renting it.

  vllama-plan --config configs/stage1_vicuna7b.py --mesh v4-32
  vllama-plan --config configs/stage2_llama2_13b.py --mesh 1,8,1 --hbm-gib 72 \
      --config.train.accum_steps=2 --json plan.json
  vllama-plan --config configs/stage1_vicuna7b.py --mesh v4-32 --accum 1,2,4   # peaks side by side

`--mesh` is a target of `vllama_jax.mesh_presets` (its preset for the config's LLaMA size and
stage: the mesh and settings such as `model.remat`, which `--config.x=y` overrides win over;
`v5p-128:stage2` forces the stage) or an explicit `data,fsdp,tensor` shape. The real
train step (the same functions `vllama-train` jits) is lowered and compiled for that many fake
CPU devices from `jax.ShapeDtypeStruct`s that carry the shardings, so nothing of real size is
ever allocated. Printed per device: trainable params, optimizer state, frozen params and batch
(from the sharded shapes), and XLA's own buffer assignment (arguments, outputs, donated aliases,
temporaries = activations and scratch); FLOPs per step from XLA's cost analysis. With a target or
`--hbm-gib` it says whether the step fits.

Exit status: 0 fits (or no HBM size to judge by), 1 does not fit, 2 bad arguments or config.

The numbers are XLA:CPU's (compiled with its memory-minimizing scheduler, as the TPU/GPU
compilers schedule to bound memory): its fusion and buffer assignment differ from the TPU/GPU
compilers' (which e.g. keep bf16 where the CPU may upcast), so treat the verdict as an estimate
with a margin, not a guarantee. Emulating N devices needs `XLA_FLAGS=--xla_force_host_platform_device_count=N`
before jax starts: the CLI sets it, or runs itself in a subprocess when jax was already imported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Sequence

from vllama_jax import config_loader
from vllama_jax.cli_errors import UserError, entry_point

GIB = 1024 ** 3
REEXEC_ENV = "VLLAMA_PLAN_REEXEC"
_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


class PlanError(ValueError):
    """A config / mesh combination that cannot be planned (the message says why)."""


# ------------------------------------------------------------------------------ arguments

def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(args, `--config.x=y` overrides)."""
    p = argparse.ArgumentParser(prog="vllama-plan", description=__doc__.split("\n\n")[0],
                                epilog="Extra --config.x=y arguments override config fields.")
    p.add_argument("--config", required=True, help="config file (as for vllama-train; 'path:arg' works)")
    p.add_argument("--mesh", required=True,
                   help="a target of vllama_jax/mesh_presets.py (e.g. v4-32, v5p-128:stage2) "
                        "or data,fsdp,tensor")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="accelerator memory per device to judge by (default: the target's)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    p.add_argument("--accum", default=None, type=parse_accum, metavar="LIST",
                   help="plan once per train.accum_steps in this comma list (e.g. 1,2,4) and print "
                        "the per-device peaks side by side")
    args, rest = p.parse_known_args(list(argv))
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, rest


def parse_accum(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of accum_steps >= 1, e.g. 1,2,4")
    return values


def load_config(path: str, overrides: Sequence[str] = ()):
    """An ml_collections config file with `--config.x=y` overrides, as `vllama-train` reads it
    (`config_loader.load`: a missing file or an unknown key is one line, "did you mean")."""
    try:
        return config_loader.load(path, overrides, prog="vllama-plan")
    except UserError as e:
        raise PlanError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class MeshChoice:
    shape: tuple[int, int, int]
    target: str = ""             # preset target name, or '' for an explicit shape
    hbm_gib: float | None = None
    peak_tflops: float | None = None

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)


def resolve_mesh(mesh: str, config, hbm_gib: float | None = None, keep: Sequence[str] = ()) -> MeshChoice:
    """`--mesh` -> shape (and the target's HBM / peak FLOPs when it names one).

    A target also applies its preset's settings (e.g. `train.accum_steps`) to `config`, except
    the dotted paths in `keep` (what the user overrode on the command line)."""
    if re.fullmatch(r"\s*\d+\s*,\s*\d+\s*,\s*\d+\s*", mesh):
        shape = tuple(int(s) for s in mesh.split(","))
        if min(shape) < 1:
            raise PlanError(f"--mesh {mesh!r}: every axis needs at least 1 device")
        return MeshChoice(shape, hbm_gib=hbm_gib)
    from vllama_jax import mesh_presets as presets
    name, _, stage = mesh.partition(":")
    if stage and not re.fullmatch(r"stage[12]", stage):
        raise PlanError(f"--mesh {mesh!r}: the part after ':' must be stage1 or stage2")
    try:
        target = presets.target(name)
        presets.apply(config, name, int(stage[-1]) if stage else None, keep=tuple(keep))
        shape = tuple(config.mesh.shape)
    except ValueError as e:
        raise PlanError(f"--mesh {mesh!r}: {e}; or give an explicit data,fsdp,tensor shape") from e
    return MeshChoice(tuple(shape), name, target.hbm_gib if hbm_gib is None else hbm_gib,
                      target.peak_tflops)


# ------------------------------------------------------------------------------ fake devices

# XLA:CPU's default scheduler trades memory for concurrency (it may e.g. keep every layer's
# all-gathered weights alive at once); the TPU and GPU compilers schedule to bound memory, so the
# plan compiles with XLA:CPU's memory-minimizing scheduler unless XLA_FLAGS says otherwise.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def _with_device_count(xla_flags: str, n: int) -> str:
    """XLA_FLAGS for planning on `n` fake CPU devices, other flags kept."""
    rest = _COUNT_FLAG.sub("", xla_flags).split()
    if not any(f.startswith(_SCHEDULER_FLAG + "=") for f in rest):
        rest.append(_SCHEDULER_FLAG + "=false")
    return " ".join(rest + [f"--xla_force_host_platform_device_count={n}"])


def _env_has_devices(n: int) -> bool:
    m = _COUNT_FLAG.search(os.environ.get("XLA_FLAGS", ""))
    return bool(m) and int(m.group(1)) == n and os.environ.get("JAX_PLATFORMS") == "cpu"


def fake_devices_ready(n: int) -> bool:
    """Whether this process can plan on `n` fake CPU devices: sets XLA_FLAGS when jax is not
    imported yet (the normal CLI case); False when jax already runs with other flags."""
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = _with_device_count(os.environ.get("XLA_FLAGS", ""), n)
        os.environ["JAX_PLATFORMS"] = "cpu"
        return True
    return _env_has_devices(n)


def run_in_subprocess(n: int, argv: Sequence[str]) -> int:
    """`python -m vllama_jax.plan argv` in a fresh process with `n` fake devices (used when this
    process' jax was started with other flags, e.g. by a config file or a caller)."""
    if os.environ.get(REEXEC_ENV):
        raise PlanError(f"re-ran with XLA_FLAGS for {n} devices, but they did not take effect")
    env = dict(os.environ, XLA_FLAGS=_with_device_count(os.environ.get("XLA_FLAGS", ""), n),
               JAX_PLATFORMS="cpu", **{REEXEC_ENV: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.call([sys.executable, "-m", "vllama_jax.plan", *argv], env=env)


# ------------------------------------------------------------------------------ abstract batch

def batch_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Global batch shapes/dtypes for the config's data builder (one process: the whole batch)."""
    builder = str(config.data.train_builder)
    if builder.startswith("data_pipelines.loader:"):
        from data_pipelines import loader
        return loader.batch_spec(loader.loader_config_from(config, train=True))
    if builder.startswith("vllama_jax.train.toy:"):
        import numpy as np
        shape = (int(config.train.batch_size), int(config.data.seq_len))
        return {"tokens": (shape, np.int32), "labels": (shape, np.int32)}
    if config.data.get("batch_spec_builder"):
        from vllama_jax.train.task import import_string
        return import_string(config.data.batch_spec_builder)(config)
    raise PlanError(f"cannot tell the batch shapes of data builder {builder!r}: set "
                    f"config.data.batch_spec_builder to a 'module:function' returning "
                    f"{{name: (shape, dtype)}}")


def check_batch_split(config, shape: Sequence[int]) -> None:
    """The global batch (each of its `accum_steps` micro-batches) splits over data x fsdp."""
    accum = int(config.train.get("accum_steps", 1))
    global_batch = int(config.train.batch_size)
    rows = shape[0] * shape[1]
    if accum < 1 or global_batch % accum or (global_batch // accum) % rows:
        raise PlanError(f"global batch {global_batch} in {accum} micro-batch(es) does not split over "
                        f"data x fsdp = {rows} devices")
    if config.data.get("pack", False):
        slots = int(config.data.get("media_per_batch", 0)) or 2 * global_batch
        if slots % accum or (slots // accum) % rows:
            raise PlanError(f"config.data.media_per_batch {slots} packed media slots in {accum} micro-batch(es) "
                            f"do not split over data x fsdp = {rows} devices")


# ------------------------------------------------------------------------------ sizes

def _shard_bytes(x) -> int:
    """Bytes of one device's shard of a sharded ShapeDtypeStruct (the largest, if uneven)."""
    import numpy as np
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def tree_bytes_per_device(tree) -> int:
    import jax
    return sum(_shard_bytes(x) for x in jax.tree.leaves(tree))


def check_divisible(tree, mesh_axis_sizes: dict[str, int], what: str) -> None:
    """Every sharded dim must split evenly over its mesh axes (jit refuses uneven arguments);
    raises naming the first offending arrays."""
    import jax
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        spec = x.sharding.spec
        for dim, axes in zip(x.shape, tuple(spec) + (None,) * (len(x.shape) - len(spec))):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(mesh_axis_sizes[a] for a in axes)
            if dim % ways:
                bad.append(f"{what}{jax.tree_util.keystr(path)} {tuple(x.shape)}: dim of size {dim} "
                           f"split {ways} ways over {axes}")
                break
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise PlanError("mesh " + ", ".join(f"{k}={v}" for k, v in mesh_axis_sizes.items()) +
                        " does not divide: " + "; ".join(bad[:5]) + more)


# ------------------------------------------------------------------------------ the plan

@dataclasses.dataclass
class Plan:
    config: str
    mesh_shape: tuple[int, int, int]
    target: str
    num_devices: int
    global_batch: int
    accum_steps: int
    trainable_params: int          # counts (whole model)
    frozen_params: int
    # Per device, from the sharded shapes:
    trainable_bytes: int
    optimizer_bytes: int
    frozen_bytes: int
    batch_bytes: int
    # Per device, from XLA's buffer assignment (compiled.memory_analysis()):
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int                # arguments + outputs - donated aliases + temporaries
    flops_per_device: float        # compiled.cost_analysis() of one step
    flops_total: float
    lower_s: float
    compile_s: float
    hbm_gib: float | None = None
    fits: bool | None = None
    peak_tflops: float | None = None
    min_step_s: float | None = None    # flops at the device's peak: a lower bound
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        g = format_bytes
        d, f, t = self.mesh_shape
        lines = [
            f"config {self.config} on {self.target or 'an explicit mesh'}: mesh data={d} fsdp={f} "
            f"tensor={t} ({self.num_devices} devices), global batch {self.global_batch}"
            + (f" in {self.accum_steps} micro-batches" if self.accum_steps > 1 else ""),
            f"params: {self.trainable_params:,} trainable, {self.frozen_params:,} frozen",
            "per device, from the sharded shapes:",
            f"  trainable params    {g(self.trainable_bytes)}",
            f"  optimizer state     {g(self.optimizer_bytes)}",
            f"  frozen params       {g(self.frozen_bytes)}",
            f"  batch               {g(self.batch_bytes)}",
            "per device, XLA buffer assignment of the compiled step:",
            f"  arguments           {g(self.argument_bytes)}",
            f"  outputs             {g(self.output_bytes)}",
            f"  donated (aliased)   {g(-self.alias_bytes)}",
            f"  activations + temp  {g(self.temp_bytes)}",
            f"  peak                {g(self.peak_bytes)}",
            f"FLOPs per step: {self.flops_per_device:.3e} per device, {self.flops_total:.3e} total"
            + (f"; >= {self.min_step_s:.3f} s/step at {self.peak_tflops:g} TFLOP/s peak"
               if self.min_step_s is not None else ""),
            f"lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s (XLA:CPU)",
        ]
        lines += [f"note: {n}" for n in self.notes]
        if self.fits is not None:
            use = self.peak_bytes / (self.hbm_gib * GIB)
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            lines.append(f"{verdict}: peak {format_bytes(self.peak_bytes).strip()} "
                         f"of {self.hbm_gib:g} GiB HBM per device ({100 * use:.0f}%)")
        return "\n".join(lines)


def with_accum(config, accum: int):
    """A copy of `config` with `train.accum_steps = accum`."""
    import copy
    out = copy.deepcopy(config)
    with out.unlocked():
        out.train.accum_steps = int(accum)
    return out


def accum_table(plans: Sequence[Plan]) -> str:
    """Peak per device for each accum_steps, against accum 1's peak plus one micro-batch of its
    activations (its activations + temp / accum_steps, the activations scaling with the batch):
    what accumulation should cost at most, since it only adds the gradient accumulators."""
    base = next((p for p in plans if p.accum_steps == 1), None)
    g = lambda n: format_bytes(n).strip()  # noqa: E731
    lines = ["| accum_steps | micro-batch | activations + temp | peak per device | "
             "accum-1 peak + 1 micro-batch of activations | within |", "|---|---|---|---|---|---|"]
    for p in plans:
        bound = None if base is None else base.peak_bytes + base.temp_bytes / p.accum_steps
        lines.append(f"| {p.accum_steps} | {p.global_batch // p.accum_steps} | {g(p.temp_bytes)} | "
                     f"{g(p.peak_bytes)} | {'-' if bound is None else g(bound)} | "
                     f"{'-' if bound is None else ('yes' if p.peak_bytes <= bound else 'NO')} |")
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    """Right-aligned, in the largest binary unit that keeps the number >= 1."""
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n:8.0f} B  "


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def plan(config, choice: MeshChoice, *, config_name: str = "", devices=None,
         say=lambda line: None) -> Plan:
    """Lowers and compiles `config`'s train step for `choice`'s mesh on (fake) devices; needs
    at least `choice.num_devices` jax devices (the CLI makes them). `say` gets progress lines."""
    import jax

    from vllama_jax import sharding
    from vllama_jax.train import config_lib, loop, partition
    from vllama_jax.train import step as train_step
    from vllama_jax.train.task import build_task

    n = choice.num_devices
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise PlanError(f"mesh {choice.shape} needs {n} devices, this process has {len(devices)} "
                        f"(run the vllama-plan CLI, which emulates them)")
    check_batch_split(config, choice.shape)
    mesh = sharding.make_mesh(choice.shape, devices=devices[:n])
    accum = int(config.train.get("accum_steps", 1))
    global_batch = int(config.train.batch_size)

    task = build_task(config)
    su = loop._setup(config, task, mesh)
    spec = batch_spec(config)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
             for k, (shape, dtype) in spec.items()}
    sizes = dict(mesh.shape)
    check_divisible(su.abstract_state.params, sizes, "trainable")
    check_divisible(su.abstract_frozen, sizes, "frozen")

    step_fn = train_step.make_train_step(task, su.tx, su.schedule, accum_steps=accum,
                                         compute_dtype=config_lib.dtype_of(config.train.get("compute_dtype")))
    jitted = train_step.jit_train_step(step_fn, mesh, su.state_sh, su.frozen_sh,
                                       {k: v.sharding for k, v in batch.items()})
    say(f"lowering the train step for {n} devices...")
    t0 = time.perf_counter()
    lowered = jitted.lower(su.abstract_state, su.abstract_frozen, batch)
    t1 = time.perf_counter()
    say(f"lowered in {t1 - t0:.0f} s; compiling (minutes for real-size models)...")
    compiled = lowered.compile()
    t2 = time.perf_counter()

    mem = compiled.memory_analysis()
    if mem is None:
        raise PlanError("this jax backend gives no memory analysis for compiled programs")
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    flops = float(_cost(compiled).get("flops", float("nan")))
    notes = []
    if accum > 1:
        notes.append(f"XLA counts a loop body once: FLOPs are for one of the {accum} micro-batches "
                     f"plus the update (multiply the model part by {accum})")
    hbm = choice.hbm_gib
    fits = None if hbm is None else peak <= hbm * GIB
    min_step = (flops / (choice.peak_tflops * 1e12) * (accum if accum > 1 else 1)
                if choice.peak_tflops and math.isfinite(flops) else None)
    state = su.abstract_state
    return Plan(
        config=config_name, mesh_shape=tuple(choice.shape), target=choice.target, num_devices=n,
        global_batch=global_batch, accum_steps=accum,
        trainable_params=partition.count(state.params), frozen_params=partition.count(su.abstract_frozen),
        trainable_bytes=tree_bytes_per_device(state.params),
        optimizer_bytes=tree_bytes_per_device(state.opt_state),
        frozen_bytes=tree_bytes_per_device(su.abstract_frozen),
        batch_bytes=tree_bytes_per_device(batch),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes), peak_bytes=int(peak),
        flops_per_device=flops, flops_total=flops * n, lower_s=t1 - t0, compile_s=t2 - t1,
        hbm_gib=hbm, fits=fits, peak_tflops=choice.peak_tflops, min_step_s=min_step, notes=tuple(notes))


# ------------------------------------------------------------------------------ CLI

@entry_point("vllama-plan")
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`vllama-plan`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    try:
        config = load_config(args.config, overrides)
        choice = resolve_mesh(args.mesh, config, args.hbm_gib, keep=config_loader.overridden(overrides))
        check_batch_split(config, choice.shape)   # before minutes of building and compiling
        configs = [with_accum(config, a) for a in args.accum] if args.accum else [config]
        for c in configs:
            check_batch_split(c, choice.shape)
        if not fake_devices_ready(choice.num_devices):
            return run_in_subprocess(choice.num_devices, argv)
        import jax
        say = lambda line: print(f"vllama-plan: {line}", file=sys.stderr, flush=True)  # noqa: E731
        reports = []
        for c in configs:
            if args.accum:
                say(f"accum_steps={c.train.accum_steps}:")
            reports.append(plan(c, choice, config_name=args.config, say=say))
    except PlanError as e:
        print(f"vllama-plan: {e}", file=sys.stderr)
        return 2
    print("\n\n".join(r.format() for r in reports))
    if args.accum:
        print("\n" + accum_table(reports))
    if args.json:
        extra = {"jax_device_count": jax.device_count(), "subprocess": bool(os.environ.get(REEXEC_ENV))}
        with open(args.json, "w") as f:
            json.dump({"accum": [{**r.to_dict(), **extra} for r in reports]} if args.accum
                      else {**reports[0].to_dict(), **extra}, f, indent=2)
    return 1 if any(r.fits is False for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
