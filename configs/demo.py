"""The demo's settings live in the package (`vllama_jax/demo/config.py`, so a non-editable install
has them); this file re-exports them next to the other configs."""
from vllama_jax.demo.config import get_config, stage_config  # noqa: F401
