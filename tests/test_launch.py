"""launch/: every script's --dry-run prints well-formed commands (parsed here, the trainer's own
arguments parsed by vllama-train's parser); the GPU script really runs the trainer; the SLURM
script starts a real 2-process jax.distributed run through a stand-in `srun` (slow)."""
import os
import shlex
import socket
import subprocess
import sys
import textwrap

import pytest

from vllama_jax.train import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["tpu_pod.sh", "tpu_worker.sh", "gpu_single_host.sh", "slurm.sbatch"]
PRESET = "configs/mesh_presets.py:stage1_vicuna7b,v4-32"


def _clean_env(**extra):
    """This environment without SLURM/XLA/JAX variables (the test runner may itself be a job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "XLA_")) and k != "GPUS_PER_NODE"}
    env.update(extra)
    return env


def _script(name, *args, env=None, check=True):
    r = subprocess.run(["bash", os.path.join(LAUNCH, name), *args], capture_output=True, text=True,
                       env=env or _clean_env(), cwd="/", timeout=60)
    if check:
        assert r.returncode == 0, f"{name} {args} exited {r.returncode}:\n{r.stderr}"
    return r


def _commands(stdout):
    """The dry-run's lines, each parsed as one shell command."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert lines, "the dry run printed nothing"
    return [shlex.split(ln) for ln in lines]


def _option(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, f"{name}= given {len(values)} times in {argv}"
    return values[0]


def _trainer_args(argv):
    """The arguments after `-m vllama_jax.train.cli`."""
    i = argv.index("-m")
    assert argv[i + 1] == "vllama_jax.train.cli", argv
    return argv[i + 2:]


def _parse_trainer(args, monkeypatch):
    """vllama-train's own parser accepts them; configs resolve against the repository root."""
    monkeypatch.chdir(REPO)
    return cli.parse(["vllama-train", *args])


def _bash_syntax_ok(command):
    r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert r.returncode == 0, f"not valid shell: {command!r}: {r.stderr}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_syntax_and_usage(name):
    subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], check=True)
    assert os.access(os.path.join(LAUNCH, name), os.X_OK), f"{name} is not executable"
    r = _script(name, "--help")
    assert "Usage:" in r.stdout
    bad = _script(name, "--no-such-flag", check=False)
    assert bad.returncode == 2 and "no-such-flag" in bad.stderr + bad.stdout


def test_tpu_pod_dry_run(monkeypatch):
    r = _script("tpu_pod.sh", "--tpu", "vl-pod", "--zone", "us-central2-b", "--project", "proj",
                "--create", "--spot", "--setup", "--delete", "--dry-run",
                "--config", PRESET, "--workdir", "gs://ckpt-bucket/runs/s1", "--",
                "--config.data.dataset_shards.webvid=gs://data-bucket/webvid/train-*.array_record",
                "--config.data.dataset_shards.cc_sbu_align=gs://data-bucket/cc/train-*.array_record",
                "--config.paths.llama_model=/gcs/data-bucket/vicuna-7b",
                "--config.model.prompt_template=it's {} ###")
    cmds = _commands(r.stdout)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    for c in gcloud:
        assert c[1:4] == ["compute", "tpus", "tpu-vm"], c
        assert c[5] == "vl-pod" or c[4] == "scp", c
        assert _option(c, "--zone") == "us-central2-b" and _option(c, "--project") == "proj", c
    verbs = [c[4] for c in gcloud]
    assert verbs == ["create", "ssh", "scp", "ssh", "ssh", "delete"], verbs
    create = gcloud[0]
    assert _option(create, "--accelerator-type") == "v4-32"
    assert _option(create, "--version") == "tpu-ubuntu2204-base"
    assert "--spot" in create

    archive = next(c for c in cmds if c[0] == "git")
    assert archive[1:3] == ["-C", REPO] and archive[3] == "archive" and archive[-1] == "HEAD", archive
    tarball = archive[archive.index("-o") + 1]
    scp = gcloud[2]
    assert scp[5:7] == [tarball, "vl-pod:vllama_jax.tar.gz"] and "--worker=all" in scp, scp

    ssh = [c for c in gcloud if c[4] == "ssh"]
    for c in ssh:
        assert "--worker=all" in c, c
        _bash_syntax_ok(_option(c, "--command"))
    assert "tpu_worker.sh setup" in _option(ssh[1], "--command")

    remote = shlex.split(_option(ssh[2], "--command"))
    assert remote[:4] == ["bash", "~/vllama_jax/launch/tpu_worker.sh", "run", "--mount"], remote
    sep = remote.index("--")
    assert remote[3:sep] == ["--mount", "data-bucket"], "each gs:// data bucket mounted once"
    args = remote[sep + 1:]
    assert "--config.data.dataset_shards.webvid=/gcs/data-bucket/webvid/train-*.array_record" in args
    assert "--config.model.prompt_template=it's {} ###" in args
    config, workdir, distributed = _parse_trainer(["--jax_distributed", *args], monkeypatch)
    assert workdir == "gs://ckpt-bucket/runs/s1" and distributed
    assert tuple(config.mesh.shape) == (1, 16, 1)   # the v4-32 preset reached the config
    assert config.data.dataset_shards.cc_sbu_align == "/gcs/data-bucket/cc/train-*.array_record"
    assert gcloud[-1][-1] == "--quiet"


def test_tpu_pod_detach_and_defaults():
    r = _script("tpu_pod.sh", "--tpu", "t", "--zone", "europe-west4-b", "--create",
                "--accelerator-type", "v5litepod-256", "--detach", "--dry-run",
                "--config", "configs/toy.py", "--workdir", "gs://b/toy")
    cmds = _commands(r.stdout)
    assert [c[4] for c in cmds] == ["create", "ssh"]
    assert _option(cmds[0], "--version") == "v2-alpha-tpuv5-lite"
    assert "--spot" not in cmds[0]
    command = _option(cmds[1], "--command")
    _bash_syntax_ok(command)
    assert command.startswith("nohup bash ~/vllama_jax/launch/tpu_worker.sh run -- ")
    assert command.endswith("> ~/vllama_train.log 2>&1 < /dev/null &")


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--config", "c", "--workdir", "gs://b/r"], "--tpu"),
    (["--tpu", "t", "--zone", "z", "--config", "c", "--workdir", "/local/dir"], "gs://"),
    (["--tpu", "t", "--zone", "z", "--workdir", "gs://b/r"], "--config"),
    (["--tpu", "t", "--zone", "z", "--create", "--accelerator-type", "v9-8", "--no-run"], "--version"),
])
def test_tpu_pod_rejects(args, message):
    r = _script("tpu_pod.sh", "--dry-run", *args, check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_tpu_worker_dry_run(monkeypatch):
    env = _clean_env(VLLAMA_VENV="/opt/venv")
    setup = _commands(_script("tpu_worker.sh", "--dry-run", "setup", env=env).stdout)
    assert setup[0] == ["python3", "-m", "venv", "/opt/venv"], setup[0]
    pip = next(c for c in setup if c[:2] == ["/opt/venv/bin/pip", "install"] and "-e" in c)
    assert pip[pip.index("-e") + 1] == REPO and "jax[tpu]" in pip and "gcsfs" in pip
    assert ["sudo", "apt-get", "install", "-y", "-q", "gcsfuse"] in setup
    sh = next(c for c in setup if c[:3] == ["sudo", "sh", "-c"])
    _bash_syntax_ok(sh[3])

    run = _commands(_script("tpu_worker.sh", "--dry-run", "run", "--mount", "data-bucket", "--",
                            f"--config={PRESET}", "--workdir=gs://b/r", env=env).stdout)
    assert run[-2] == ["gcsfuse", "--implicit-dirs", "-o", "ro", "data-bucket", "/gcs/data-bucket"]
    assert run[-1][:4] == ["/opt/venv/bin/python", "-m", "vllama_jax.train.cli", "--jax_distributed"]
    config, workdir, distributed = _parse_trainer(_trainer_args(run[-1]), monkeypatch)
    assert distributed and workdir == "gs://b/r" and tuple(config.mesh.shape) == (1, 16, 1)
    bad = _script("tpu_worker.sh", "--dry-run", "run", "--mount", "Bad/Bucket", "--", env=env, check=False)
    assert bad.returncode == 2 and "bucket name" in bad.stderr


def test_gpu_single_host_dry_run(monkeypatch):
    r = _script("gpu_single_host.sh", "--config", "configs/mesh_presets.py:stage2_llama2_13b,8xh100",
                "--workdir", "/ckpt/run", "--gpus", "0,1,2,3", "--dry-run", "--",
                "--config.train.accum_steps=2", env=_clean_env(PYTHON="/usr/bin/python3.12"))
    (cmd,) = _commands(r.stdout)
    i = cmd.index("/usr/bin/python3.12")
    assert cmd[0] == "env"
    env = dict(a.split("=", 1) for a in cmd[1:i])
    assert env == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
                   "XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"}
    config, workdir, distributed = _parse_trainer(_trainer_args(cmd), monkeypatch)
    assert not distributed and workdir == "/ckpt/run"
    assert tuple(config.mesh.shape) == (1, 8, 1) and config.model.llama == "llama2_13b"
    assert config.train.accum_steps == 2
    bad = _script("gpu_single_host.sh", "--config", "c", "--workdir", "w", "--gpus", "0;rm",
                  "--dry-run", check=False)
    assert bad.returncode == 2 and "--gpus" in bad.stderr


@pytest.mark.parametrize("per_node", [False, True])
def test_slurm_dry_run(per_node, monkeypatch):
    slurm = dict(SLURM_JOB_ID="1234", SLURM_NNODES="4", SLURM_NTASKS="4" if per_node else "32",
                 SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=REPO)
    r = _script("slurm.sbatch", "--config", "configs/mesh_presets.py:stage1_vicuna7b,4x8xa100",
                "--workdir", "/shared/run", "--dry-run", env=_clean_env(**slurm))
    (cmd,) = _commands(r.stdout)
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none"] and cmd[3] == "env", cmd
    i = cmd.index("python3")
    env = dict(a.split("=", 1) for a in cmd[4:i])
    assert env.get("JAX_LOCAL_DEVICE_IDS") == ("0,1,2,3,4,5,6,7" if per_node else None), env
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    config, workdir, distributed = _parse_trainer(_trainer_args(cmd), monkeypatch)
    assert distributed and workdir == "/shared/run" and tuple(config.mesh.shape) == (4, 8, 1)


def test_slurm_refuses_outside_a_job_and_without_checkout(tmp_path):
    r = _script("slurm.sbatch", "--config", "c", "--workdir", "w", check=False)
    assert r.returncode == 2 and "sbatch" in r.stderr
    r = _script("slurm.sbatch", "--config", "c", "--workdir", "w", "--dry-run",
                env=_clean_env(SLURM_SUBMIT_DIR=str(tmp_path)), check=False)
    assert r.returncode == 2 and "VLLAMA_REPO" in r.stderr


def _toy_args(workdir, steps=2):
    return ["--config", "configs/toy.py", "--workdir", str(workdir), "--",
            f"--config.train.total_steps={steps}", "--config.train.progress=False",
            "--config.train.tensorboard=False", "--config.train.eval_every=0"]


def test_gpu_single_host_runs_the_trainer(tmp_path):
    """Not only a dry run: the script's command trains (here on CPU, which ignores the GPU flags)."""
    env = _clean_env(PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    r = _script("gpu_single_host.sh", *_toy_args(tmp_path / "run"), env=env, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished at step 2" in r.stderr
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_gpu_single_host_stops_without_a_gpu(tmp_path):
    """A CPU-only jax (this machine) would train on the CPU: the script says to install the GPU extra."""
    r = _script("gpu_single_host.sh", *_toy_args(tmp_path / "run"), env=_clean_env(PYTHON=sys.executable),
                check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "jax sees no GPU (its backend: cpu)" in r.stderr and '.[gpu]' in r.stderr
    assert not (tmp_path / "run").exists()


FAKE_SRUN = textwrap.dedent('''\
    #!{python}
    """Stand-in for srun on one machine: starts $SLURM_NTASKS copies of the command with the
    variables a real job step sets, and fails if any copy fails."""
    import os, subprocess, sys
    argv = sys.argv[1:]
    while argv[0].startswith("--"):   # srun's own options
        argv.pop(0)
    n = int(os.environ["SLURM_NTASKS"])
    procs = [subprocess.Popen(argv, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                             SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1"))
             for i in range(n)]
    sys.exit(max(p.wait() for p in procs))
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ci
def test_slurm_script_starts_a_distributed_run(tmp_path):
    """slurm.sbatch -> srun -> 2 x vllama-train --jax_distributed, which finds its coordinator,
    process count and id in SLURM's variables (jax's auto-detection, no addresses passed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_JOB_ID="4242",
        SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_SUBMIT_DIR=REPO, JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_PORT=str(_free_port()))
    workdir = tmp_path / "run"
    r = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), *_toy_args(workdir, steps=3)],
                       capture_output=True, text=True, env=env, cwd="/", timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("finished at step 3") == 2, r.stderr[-4000:]
    # Both processes joined one checkpoint: the data iterator state has one file per process.
    data = workdir / "checkpoints" / "3" / "data"
    assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
