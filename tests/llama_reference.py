"""PyTorch reference helpers for the LLaMA tests: tiny random `transformers.LlamaForCausalLM`s.

The HF config is written out by hand (not via our `config_to_hf`) so a converter bug cannot hide
itself by shaping the reference the same wrong way.
"""
import numpy as np

from vllama_jax.models.llama import LlamaConfig

VOCAB, HIDDEN, INTER, LAYERS, HEADS, HEAD_DIM = 256, 64, 160, 2, 4, 16


def hf_config(kv_heads: int = 2, llama3_scaling: bool = False, tied: bool = False):
    import transformers
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if llama3_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=HEAD_DIM, rms_norm_eps=1e-6,
        max_position_embeddings=128, rope_parameters=rope, tie_word_embeddings=tied,
        attn_implementation="eager")


def our_config(kv_heads: int = 2, llama3_scaling: bool = False, tied: bool = False) -> LlamaConfig:
    name = "tiny_llama3" if llama3_scaling else ("tiny" if kv_heads == 2 else "tiny_mha")
    return LlamaConfig.preset(name, num_kv_heads=kv_heads, tie_word_embeddings=tied)


def hf_model(seed: int = 0, **kw):
    """A random HF model whose weights give O(1) activations (HF's 0.02 init would make every
    logit tiny and any error look small)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(**kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    return model


def padded_batch(rng, batch=3, length=12, vocab=VOCAB):
    """ids and a {0,1} mask with a right-padded row (3 pads), a left-padded row (4 pads), a full row."""
    ids = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, -3:] = 0
    if batch > 1:
        mask[1, :4] = 0
    return ids, mask


def hf_positions(mask):
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def hf_logits(model, ids, mask, positions=None, hidden=False):
    import torch
    positions = hf_positions(mask) if positions is None else positions
    with torch.no_grad():
        inputs = dict(input_ids=torch.as_tensor(ids, dtype=torch.long),
                      attention_mask=torch.as_tensor(mask, dtype=torch.long),
                      position_ids=torch.as_tensor(positions, dtype=torch.long))
        logits = model(**inputs).logits.float().numpy()
        if not hidden:
            return logits
        return logits, model.model(**inputs).last_hidden_state.float().numpy()


def max_err_on_tokens(actual, expected, mask):
    sel = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(np.asarray(actual, np.float64)[sel] - np.asarray(expected, np.float64)[sel])))
