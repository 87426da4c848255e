"""Weight conversion between PyTorch checkpoints and Flax params."""
