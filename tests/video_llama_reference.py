"""PyTorch reference for the Video-LLaMA heads, keyed like the released checkpoints.

The reference's video/audio Q-Formers are LAVIS `BertLMHeadModel`s, which do not build with
transformers 5; `transformers.Blip2QFormerModel` is the same block (see tests/lavis_reference.py),
so each branch here is that model plus `nn.Parameter` query tokens, an `nn.Embedding` position table
and an `nn.Linear` projection. `state_dict()` / `load()` speak the reference's key names
(`video_Qformer.bert.*`, `video_query_tokens`, `video_frame_position_embedding.weight`,
`llama_proj.*`, and the `audio_` counterparts), renaming LAVIS <-> HF for the Q-Former.
"""
from __future__ import annotations

import dataclasses

import numpy as np

import lavis_reference as ref

torch = ref.torch

BRANCH_KEYS = {
    "video": ("video_Qformer.bert.", "video_query_tokens", "video_frame_position_embedding", "llama_proj"),
    "audio": ("audio_Qformer.bert.", "audio_query_tokens", "audio_position_embedding", "audio_llama_proj"),
}


@dataclasses.dataclass
class Heads:
    """One branch: Q-Former, query tokens, position table, projection (eval mode)."""
    branch: str
    qformer: "torch.nn.Module"
    query_tokens: "torch.nn.Parameter"
    position: "torch.nn.Embedding"
    proj: "torch.nn.Linear"

    def state_dict(self) -> dict[str, np.ndarray]:
        prefix, query_key, pos_key, proj_key = BRANCH_KEYS[self.branch]
        sd = {ref.hf_to_lavis_key(k, prefix): v.detach().numpy().copy() for k, v in self.qformer.state_dict().items()}
        sd[query_key] = self.query_tokens.detach().numpy().copy()
        sd[f"{pos_key}.weight"] = self.position.weight.detach().numpy().copy()
        sd[f"{proj_key}.weight"] = self.proj.weight.detach().numpy().copy()
        sd[f"{proj_key}.bias"] = self.proj.bias.detach().numpy().copy()
        return sd

    def load(self, sd) -> set[str]:
        """Loads the branch's keys from a reference-named state dict (every one must be there);
        returns the keys it used."""
        prefix, query_key, pos_key, proj_key = BRANCH_KEYS[self.branch]
        names = {ref.hf_to_lavis_key(k, prefix): k for k in self.qformer.state_dict()}
        t = lambda k: torch.as_tensor(np.asarray(sd[k]))  # noqa: E731
        self.qformer.load_state_dict({hf: t(k) for k, hf in names.items()}, strict=True)
        with torch.no_grad():
            self.query_tokens.copy_(t(query_key))
        self.position.load_state_dict({"weight": t(f"{pos_key}.weight")}, strict=True)
        self.proj.load_state_dict({"weight": t(f"{proj_key}.weight"), "bias": t(f"{proj_key}.bias")}, strict=True)
        return set(names) | {query_key, f"{pos_key}.weight", f"{proj_key}.weight", f"{proj_key}.bias"}

    def parameters(self):
        yield from self.qformer.parameters()
        yield self.query_tokens
        yield from self.position.parameters()
        yield from self.proj.parameters()

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """features `[B, T, N, W]` (video: image Q-Former outputs per frame, N queries) or `[B, M, W]`
        (audio: one ImageBind embedding per clip) -> soft tokens `[B, Q, d_llm]`, as the reference's
        `encode_videoQformer_visual` / `encode_audioQformer` compute them."""
        with torch.no_grad():
            x = torch.from_numpy(np.array(features, np.float32))
            t = x.shape[1]
            pos = self.position(torch.arange(t))
            x = x + (pos[None, :, None, :] if x.ndim == 4 else pos[None])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            query = self.query_tokens.expand(x.shape[0], -1, -1)
            hidden = self.qformer(query_embeds=query, encoder_hidden_states=x,
                                  encoder_attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).last_hidden_state
            return self.proj(hidden).numpy()


def heads(branch: str, qformer_config, num_positions: int, d_llm: int, seed: int = 0) -> Heads:
    """Random heads (O(1) values, LayerNorm scales near 1) for a `QFormerConfig`."""
    qf = ref.hf_qformer(qformer_config, seed)
    torch.manual_seed(seed + 1)
    query = torch.nn.Parameter(torch.randn(1, qformer_config.num_query_tokens, qformer_config.hidden_size))
    position = ref.randomize_(torch.nn.Embedding(num_positions, qformer_config.encoder_width), seed + 2, 0.5)
    proj = ref.randomize_(torch.nn.Linear(qformer_config.hidden_size, d_llm), seed + 3, 0.3)
    return Heads(branch, qf, query, position, proj)


def reference_buffers(config, equip_audio: bool) -> dict[str, "torch.Tensor"]:
    """The buffers `VideoLLAMA.state_dict()` holds, built the way the reference modules build them
    (written out here, independently of the converter)."""
    out = {"Qformer.bert.embeddings.position_ids": torch.arange(512).expand((1, -1)),
           "video_Qformer.bert.embeddings.position_ids": torch.arange(512).expand((1, -1))}
    dim = config.llama.head_dim
    for i in range(config.llama.num_layers):
        out[f"llama_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = \
            1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    if equip_audio:
        out["audio_Qformer.bert.embeddings.position_ids"] = torch.arange(512).expand((1, -1))
        out["audio_encoder.modality_preprocessors.text.mask"] = torch.empty(77, 77).fill_(float("-inf")).triu_(1)
        for name, init in (("audio", 20.0), ("depth", 5.0), ("thermal", 10.0), ("imu", 5.0)):
            out[f"audio_encoder.modality_postprocessors.{name}.1.log_logit_scale"] = torch.ones([]) * np.log(init)
    return out


def released_checkpoint(path, trained: list[Heads], config, equip_audio: bool):
    """Writes what `runner_base._save_checkpoint` writes: the trained params and every buffer under
    "model", plus a real AdamW optimizer state, the config dict, scaler and epoch."""
    params = [p for h in trained for p in h.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    sum(p.sum() for p in params).backward()
    opt.step()
    opt.zero_grad()
    sd = {k: torch.from_numpy(v) for h in trained for k, v in h.state_dict().items()}
    sd.update(reference_buffers(config, equip_audio))
    torch.save({"model": sd, "optimizer": opt.state_dict(),
                "config": {"model": {"arch": "video_llama", "frozen_llama_proj": False}, "run": {"lr_sched": "cos"}},
                "scaler": None, "epoch": 1}, path)
    return {k: v.numpy() for k, v in sd.items()}


def random_params(config, seed: int = 0, dtype=np.float32) -> dict:
    """Random params of every branch of `config` with O(1) activations (no model init is run:
    shapes come from `eval_shape`). Kernels ~ N(0, 1/fan_in), norm scales ~ 1, biases ~ 0.1."""
    import jax
    from vllama_jax.models.video_llama import init_params

    abstract = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))["params"]
    rng = np.random.default_rng(seed)

    def one(path, x):
        name, shape = path[-1].key, tuple(x.shape)
        if name == "log_logit_scale":
            v = np.full(shape, np.log(20.0))
        elif name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("bias", "out_bias", "bias_k", "bias_v"):
            v = 0.1 * rng.standard_normal(shape)
        elif "kernel" in name:
            fan_in = shape[0] if (name == "kernel" and len(shape) == 3) else int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:  # embeddings, query tokens, position tables, cls tokens
            v = rng.standard_normal(shape)
        return np.asarray(v, dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)
