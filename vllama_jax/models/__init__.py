"""Flax Linen ports of the Video-LLaMA towers."""
