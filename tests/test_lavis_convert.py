import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close

from vllama_jax.convert import lavis
from vllama_jax.models.blip2 import Blip2ImageEncoder
from vllama_jax.models.qformer import QFormer, QFormerConfig
from vllama_jax.models.vit import EvaViT, EvaViTConfig

import lavis_reference as ref

torch = ref.torch
VIT, QF = EvaViTConfig.preset("tiny"), QFormerConfig.preset("tiny")


def _save(path, sd, wrap=True):
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    torch.save({"model": tensors, "epoch": 3} if wrap else tensors, path)
    return path


def _blip2_parts():
    """A BLIP-2-layout state dict with a 3-block EVA (config has 2, as BLIP-2 drops EVA's last) and text side."""
    vit_full = ref.eva_vit(EvaViTConfig.preset("tiny", depth=VIT.depth + 1), seed=5)
    ln_vision = ref.randomize_(torch.nn.LayerNorm(VIT.width), seed=6)
    with torch.no_grad():
        ln_vision.weight += 1.0
    hf = ref.hf_qformer(QF, seed=7)
    sd = {f"visual_encoder.{k}": v.numpy() for k, v in vit_full.state_dict().items()}
    sd.update({f"ln_vision.{k}": v.detach().numpy() for k, v in ln_vision.state_dict().items()})
    sd.update(ref.lavis_qformer_state_dict(hf, num_query=QF.num_query_tokens, seed=7))
    text = ref.lavis_text_side_keys(QF)
    rng = np.random.default_rng(1)
    text.update({k: rng.normal(size=s).astype(np.float32) for k, s in {
        "Qformer.cls.predictions.bias": (50,), "Qformer.cls.predictions.transform.dense.weight": (32, 32),
        "text_proj.weight": (16, 32), "vision_proj.weight": (16, 32), "itm_head.weight": (2, 32),
        "t5_proj.weight": (24, 32), "t5_proj.bias": (24,), "temp": ()}.items()})
    sd.update(text)
    # What LAVIS runs: a depth-2 ViT loaded non-strictly from the 3-block weights.
    vit = ref.eva_vit(VIT, seed=8)
    vit_sd = {k[len("visual_encoder."):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith("visual_encoder.")}
    missing, unexpected = vit.load_state_dict(vit_sd, strict=False)
    assert not missing and all(k.startswith("blocks.2.") for k in unexpected)
    return sd, text, vit, ln_vision, hf


def _torch_blip2(vit, ln_vision, hf, query_tokens, images):
    with torch.no_grad():
        feats = ln_vision(torch.from_numpy(ref.run_eva_vit(vit, images))).numpy()
    return ref.run_hf_qformer(hf, query_tokens, feats, np.ones(feats.shape[:2]))


def test_blip2_checkpoint_file_end_to_end(tmp_path, rng):
    sd, text, vit, ln_vision, hf = _blip2_parts()
    path = _save(tmp_path / "blip2_pretrained.pth", sd)
    params, report = lavis.load_blip2_image_encoder(path, VIT, QF, strict=True)
    assert not report.unmatched
    assert set(report.ignored) == set(text) | {k for k in sd if k.startswith("visual_encoder.blocks.2.")}
    assert "BLIP-2 drops the last block" in report.ignored["visual_encoder.blocks.2.attn.qkv.weight"]
    assert "text FFN" in report.ignored["Qformer.bert.encoder.layer.1.output.dense.weight"]
    assert set(report.loaded) | set(report.ignored) == set(sd)
    assert "ignored" in report.summary()
    images = rng.normal(size=(2, 28, 28, 3)).astype(np.float32)
    out = jax.jit(Blip2ImageEncoder(VIT, QF).apply)({"params": params}, jnp.asarray(images))
    expected = _torch_blip2(vit, ln_vision, hf, sd["query_tokens"], images)
    assert_close(out, expected, atol=1e-4, what="BLIP-2 file -> Blip2ImageEncoder vs torch")


def test_eva_vit_file_with_other_grid(tmp_path, rng):
    """`eva_vit_g.pth` layout (flat dict), pos_embed for 28 px loaded into a 42 px config as LAVIS does."""
    small = ref.eva_vit(VIT, seed=2)
    path = _save(tmp_path / "eva_vit_g.pth", {k: v.numpy() for k, v in small.state_dict().items()}, wrap=False)
    big_cfg = EvaViTConfig.preset("tiny", img_size=42)
    params, report = lavis.load_eva_vit(path, big_cfg, strict=True)
    assert report.notes and "resampled (1, 5, 64) -> (1, 10, 64)" in report.notes[0]
    big = ref.eva_vit(big_cfg, seed=3)
    sd = dict(small.state_dict())
    ref.eva_vit_module().interpolate_pos_embed(big, sd)
    big.load_state_dict(sd)
    images = rng.normal(size=(1, 42, 42, 3)).astype(np.float32)
    out = jax.jit(EvaViT(big_cfg).apply)({"params": params}, jnp.asarray(images))
    assert_close(out, ref.run_eva_vit(big, images), atol=1e-4, what="eva_vit file at 42 px")


def test_video_llama_qformer_layout(tmp_path, rng):
    video_cfg, audio_cfg = QFormerConfig.preset("tiny_video"), QFormerConfig.preset("tiny_audio")
    hf_video, hf_audio = ref.hf_qformer(video_cfg, seed=11), ref.hf_qformer(audio_cfg, seed=12)
    sd = ref.lavis_qformer_state_dict(hf_video, "video_Qformer.bert.", "video_query_tokens", 11, 8)
    sd.update(ref.lavis_qformer_state_dict(hf_audio, "audio_Qformer.bert.", "audio_query_tokens", 12, 4))
    other = {"llama_proj.weight": (16, 32), "video_frame_position_embedding.weight": (32, 32),
             "video_Qformer.bert.embeddings.position_ids": (1, 16)}
    sd.update({k: rng.normal(size=s).astype(np.float32) for k, s in other.items()})
    path = _save(tmp_path / "video_llama.pth", sd)
    for cfg, hf, name in [(video_cfg, hf_video, "video"), (audio_cfg, hf_audio, "audio")]:
        params, report = lavis.load_qformer(path, cfg, f"{name}_Qformer.bert.", f"{name}_query_tokens",
                                            strict=True)
        expected_ignored = {"video_Qformer.bert.embeddings.position_ids"} if name == "video" else set()
        assert set(report.ignored) == expected_ignored and not report.unmatched
        states = rng.normal(size=(2, 6, cfg.encoder_width)).astype(np.float32)
        out = jax.jit(QFormer(cfg).apply)({"params": params}, jnp.asarray(states))
        expected = ref.run_hf_qformer(hf, sd[f"{name}_query_tokens"], states)
        assert_close(out, expected, atol=1e-4, what=f"{name} Q-Former from a Video-LLaMA layout")


def test_round_trip_bit_exact_and_export_loads_in_torch():
    sd, text, vit, ln_vision, hf = _blip2_parts()
    params, report = lavis.blip2_image_encoder_params_from_state_dict(sd, VIT, QF)
    back = lavis.blip2_image_encoder_state_dict_from_params(params, VIT, QF)
    assert set(back) == set(report.loaded)
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and np.array_equal(v, sd[k]), k
    again, _ = lavis.blip2_image_encoder_params_from_state_dict(back, VIT, QF)
    assert jax.tree.all(jax.tree.map(np.array_equal, again, params))
    # The exported names and layouts are the PyTorch modules' own.
    vit_sd = {k[len("visual_encoder."):]: torch.from_numpy(v) for k, v in back.items() if k.startswith("visual_encoder.")}
    ref.eva_vit(VIT, seed=9).load_state_dict(vit_sd, strict=True)
    hf_names = {ref.hf_to_lavis_key(k): k for k in hf.state_dict()}
    hf.load_state_dict({hf_names[k]: torch.from_numpy(v) for k, v in back.items() if k in hf_names}, strict=True)


def test_bf16_checkpoint_round_trip(tmp_path):
    hf = ref.hf_qformer(QFormerConfig.preset("tiny_video"), seed=4)
    sd32 = ref.lavis_qformer_state_dict(hf, "video_Qformer.bert.", "video_query_tokens", 4, 8)
    path = tmp_path / "bf16.pth"
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd32.items()}, path)
    sd = lavis.read_state_dict(path)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in sd.values())
    cfg = QFormerConfig.preset("tiny_video", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    params, _ = lavis.qformer_params_from_state_dict(sd, cfg, "video_Qformer.bert.", "video_query_tokens")
    back = lavis.qformer_state_dict_from_params(params, cfg, "video_Qformer.bert.", "video_query_tokens")
    for k, v in sd.items():
        assert np.array_equal(back[k].view(np.uint16), v.view(np.uint16)), k
    out = QFormer(cfg).apply({"params": params}, jnp.ones((1, 3, cfg.encoder_width), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_missing_wrong_shape_and_unexpected_keys_are_named(tmp_path):
    sd, *_ = _blip2_parts()
    missing = {k: v for k, v in sd.items() if k != "Qformer.bert.encoder.layer.1.attention.self.key.weight"}
    with pytest.raises(lavis.CheckpointError, match=r"missing 1 key\(s\): Qformer\.bert\.encoder\.layer\.1\.attention"
                                                    r"\.self\.key\.weight"):
        lavis.blip2_image_encoder_params_from_state_dict(missing, VIT, QF)
    no_vit = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.blocks.1.")}
    with pytest.raises(lavis.CheckpointError, match=re.escape("visual_encoder.blocks.1.norm1.weight")):
        lavis.blip2_image_encoder_params_from_state_dict(no_vit, VIT, QF)
    bad = {**sd, "visual_encoder.blocks.0.attn.qkv.weight": np.zeros((3 * 64, 32), np.float32)}
    with pytest.raises(lavis.CheckpointError, match=re.escape(
            "'visual_encoder.blocks.0.attn.qkv.weight' has shape (192, 32), expected (192, 64)")):
        lavis.blip2_image_encoder_params_from_state_dict(bad, VIT, QF)
    odd_grid = {**sd, "visual_encoder.pos_embed": np.zeros((1, 7, 64), np.float32)}
    with pytest.raises(lavis.CheckpointError, match=re.escape("'visual_encoder.pos_embed' has shape (1, 7, 64), "
                                                              "expected (1, 5, 64) or another square")):
        lavis.blip2_image_encoder_params_from_state_dict(odd_grid, VIT, QF)
    extra = {**sd, "visual_encoder.blocks.0.attn.k_bias": np.zeros(64, np.float32),
             "Qformer.bert.encoder.layer.1.crossattention.self.query.weight": np.zeros((32, 32), np.float32),
             "mystery": np.zeros(1, np.float32)}
    _, report = lavis.blip2_image_encoder_params_from_state_dict(extra, VIT, QF)
    assert set(report.unmatched) == {"visual_encoder.blocks.0.attn.k_bias", "mystery",
                                     "Qformer.bert.encoder.layer.1.crossattention.self.query.weight"}
    path = _save(tmp_path / "extra.pth", extra)
    with pytest.raises(lavis.CheckpointError, match=r"3 unexpected key\(s\):.*k_bias"):
        lavis.load_blip2_image_encoder(path, VIT, QF, strict=True)


def test_unreadable_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(lavis.CheckpointError, match="garbage.pth: not a readable PyTorch weights file"):
        lavis.read_state_dict(garbage)
    odd = tmp_path / "odd.pth"
    torch.save({"model": {"w": torch.zeros(2), "step": 3}}, odd)
    with pytest.raises(lavis.CheckpointError, match="entry 'step' is a int, expected a tensor"):
        lavis.read_state_dict(odd)
    with pytest.raises(FileNotFoundError):
        lavis.read_state_dict(tmp_path / "absent.pth")
    with pytest.raises(lavis.CheckpointError, match="params: missing subtree 'ln_vision'"):
        lavis.blip2_image_encoder_state_dict_from_params({"visual_encoder": {}, "qformer": {}}, VIT, QF)
