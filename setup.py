"""vllama_jax: Video-LLaMA (arXiv 2306.02858) as a JAX/Flax training codebase."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7,<0.11",
    "flax>=0.11,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "grain>=0.2.12,<0.3",
    "array-record>=0.7,<0.9",
    "tensorflow-datasets>=4.9.8,<5",
    "ml_collections>=1.0,<2",
    "msgpack>=1,<2",
    "transformers>=4.46,<6",
    "tokenizers>=0.20,<1",
    "safetensors>=0.4,<1",
    "librosa>=0.10,<0.12",
    "av>=12,<19",
    "numpy>=1.26,<3",
    "pillow>=10,<13",
    "tqdm>=4.66,<5",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
]

EXTRAS = {
    # torch is only a parity reference / conversion backend, never a core dependency.
    "torch": ["torch==2.13.0"],
    # apache-beam: `vllama-prepare-data --beam` (data_pipelines/beam_shards.py) on DirectRunner
    # worker processes, Dataflow, Flink or Spark; optional, the default writer is a local process
    # pool. (2.77 pins protobuf < 7 and pyarrow < 26, below what pip picks otherwise.)
    "beam": ["apache-beam>=2.60,<3"],
    # vllama-web, the Gradio demo page (the reference's demo is Gradio too).
    "web": ["gradio>=6.0,<7"],
    # NVIDIA GPUs: the CUDA 12 build of the same jax (jax-cuda12-plugin + -pjrt and the CUDA/cuDNN
    # libraries as pip wheels; the driver comes from the host). launch/gpu_single_host.sh expects it.
    "gpu": ["jax[cuda12]>=0.7,<0.11"],
    # To view the TensorBoard logs the trainer writes (tensorboardX writes them without it).
    "tensorboard": ["tensorboard>=2.14,<3"],
    # decord: the original's video reader, the reference for our FFmpeg-scaled frames (x86-64
    # manylinux wheel, bundles its own FFmpeg 4.1; the parity tests skip where it is missing).
    # gradio + playwright: vllama-web's handler and browser tests (Chromium comes from apt in .ci/run).
    # apache-beam: CI checks that the Beam records equal the single-process writer's.
    "test": ["pytest>=8,<10", "torch==2.13.0", "kaldi-native-fbank>=1.20,<2",
             "decord==0.6.0; platform_machine == 'x86_64' and platform_system == 'Linux'",
             "gradio>=6.0,<7", "playwright>=1.50,<2", "apache-beam>=2.60,<3"],
}

setup(
    name="vllama_jax",
    version="0.1.0",
    description="Video-LLaMA (audio-visual instruction-tuned video LLM) in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["vllama_jax", "vllama_jax.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "vllama-demo=vllama_jax.demo.cli:demo_main",
            "vllama-prepare-data=data_pipelines.cli:main",
            "vllama-train=vllama_jax.train.cli:main",
            "vllama-convert=vllama_jax.convert.cli:main",
            "vllama-chat=vllama_jax.chat:main",
            "vllama-web=vllama_jax.web:main",
            "vllama-eval=vllama_jax.evaluate.cli:main",
            "vllama-plan=vllama_jax.plan:main",
            "vllama-bench=vllama_jax.bench:bench_main",
        ],
    },
)
