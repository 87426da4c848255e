"""PyTorch references for the vision towers: LAVIS' EVA ViT (loaded by file path) and HF's Q-Former.

LAVIS' `eva_vit.py` imports five names from timm and lavis; installing timm would pull a CUDA torch
and importing the `lavis` package pulls heavy deps, so the file is executed with tiny stand-ins
for those names. CI installs it with `pip install --no-deps salesforce-lavis==1.0.2`.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def _stub_modules():
    def drop_path(x, drop_prob=0.0, training=False):
        if drop_prob == 0.0 or not training:
            return x
        raise NotImplementedError("stochastic depth is not part of the parity reference")

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    def download_cached_file(*args, **kwargs):
        raise RuntimeError("the parity tests never download weights")

    layers = types.ModuleType("timm.models.layers")
    layers.drop_path, layers.to_2tuple, layers.trunc_normal_ = drop_path, to_2tuple, trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    dist_utils = types.ModuleType("lavis.common.dist_utils")
    dist_utils.download_cached_file = download_cached_file
    return {
        "timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
        "timm.models.layers": layers, "timm.models.registry": registry,
        "lavis": types.ModuleType("lavis"), "lavis.common": types.ModuleType("lavis.common"),
        "lavis.common.dist_utils": dist_utils,
    }


@functools.lru_cache(maxsize=1)
def _eva_vit_module():
    spec = importlib.util.find_spec("lavis")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "models", "eva_vit.py")
    import torch.utils.checkpoint  # noqa: F401  (imported by eva_vit.py; keep it a real module)
    stubs = _stub_modules()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        file_spec = importlib.util.spec_from_file_location("_lavis_eva_vit_reference", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


def eva_vit_module():
    """LAVIS `lavis/models/eva_vit.py` as a module, or skip when salesforce-lavis is not installed."""
    module = _eva_vit_module()
    if module is None:
        pytest.skip("salesforce-lavis not installed: pip install --no-deps salesforce-lavis==1.0.2")
    return module


def eva_vit(config, seed=0, img_size=None):
    """A LAVIS VisionTransformer as `create_eva_vit_g` builds it for an `EvaViTConfig`, all weights random."""
    mod = eva_vit_module()
    torch.manual_seed(seed)
    model = mod.VisionTransformer(
        img_size=img_size or config.img_size, patch_size=config.patch_size, use_mean_pooling=False,
        embed_dim=config.width, depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
        qkv_bias=True, drop_path_rate=0.0,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    return randomize_(model, seed).eval()


def randomize_(module, seed=0, scale=0.1):
    """Random values in every parameter (LayerNorm scales around 1) so zero-initialised biases count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            is_norm_scale = p.ndim == 1 and re.search(r"(norm\d?|LayerNorm|layernorm)\.weight$", name)
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return module


def hf_qformer(config, seed=0):
    """`transformers.Blip2QFormerModel` matching a `QFormerConfig`, random weights, eval mode."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    hf_config = Blip2QFormerConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        cross_attention_frequency=config.cross_attention_freq, encoder_hidden_size=config.encoder_width,
        layer_norm_eps=config.layer_norm_eps, hidden_act="gelu", attn_implementation="eager")
    torch.manual_seed(seed)
    return randomize_(Blip2QFormerModel(hf_config), seed).eval()


def hf_to_lavis_key(key: str, prefix: str = "Qformer.bert.") -> str:
    """HF Blip2QFormerModel key -> LAVIS BertModel key under `prefix`."""
    if key.startswith("layernorm."):
        return prefix + "embeddings.LayerNorm." + key[len("layernorm."):]
    return prefix + re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", key)


def lavis_qformer_state_dict(hf_model, prefix="Qformer.bert.", query_key="query_tokens", seed=0, num_query=8):
    """LAVIS-named state dict (numpy) of an HF Q-Former plus random query tokens."""
    sd = {hf_to_lavis_key(k, prefix): v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    hidden = hf_model.config.hidden_size
    sd[query_key] = np.random.default_rng(seed).normal(size=(1, num_query, hidden)).astype(np.float32)
    return sd


def lavis_text_side_keys(config, prefix="Qformer.bert.", vocab=50, rng=None):
    """The text-side tensors a LAVIS Q-Former checkpoint holds next to the query path."""
    rng = rng or np.random.default_rng(0)
    h, i = config.hidden_size, config.intermediate_size
    out = {
        f"{prefix}embeddings.word_embeddings.weight": (vocab, h),
        f"{prefix}embeddings.position_embeddings.weight": (16, h),
        f"{prefix}embeddings.position_ids": (1, 16),
    }
    for n in range(config.num_layers):
        k = f"{prefix}encoder.layer.{n}."
        out.update({k + "intermediate.dense.weight": (i, h), k + "intermediate.dense.bias": (i,),
                    k + "output.dense.weight": (h, i), k + "output.dense.bias": (h,),
                    k + "output.LayerNorm.weight": (h,), k + "output.LayerNorm.bias": (h,)})
    return {k: rng.normal(size=s).astype(np.float32) for k, s in out.items()}


def run_hf_qformer(hf_model, query_tokens, encoder_states, encoder_mask=None):
    with torch.no_grad():
        n = encoder_states.shape[0]
        query = torch.from_numpy(np.asarray(query_tokens)).expand(n, -1, -1)
        mask = None if encoder_mask is None else torch.from_numpy(np.asarray(encoder_mask, np.int64))
        out = hf_model(query_embeds=query, encoder_hidden_states=torch.from_numpy(encoder_states),
                       encoder_attention_mask=mask)
    return out.last_hidden_state.numpy()


def run_eva_vit(model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).numpy()
