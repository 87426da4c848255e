"""Video-LLaMA checkpoint layout: bit-exact round trips, the exported heads and LLaMA against PyTorch
references, a released-style checkpoint (with optimizer state and buffers) imported, bad inputs."""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_close

import video_llama_reference as vref
from vllama_jax import tree_paths
from vllama_jax.convert import common, hf_llama
from vllama_jax.convert import video_llama as vl
from vllama_jax.models.qformer import QFormer
from vllama_jax.models.video_llama import VideoLlama, VideoLlamaConfig

torch = vref.torch
CFG = VideoLlamaConfig.preset("tiny")
B, T, M = 2, 3, 2
MEDIA = ("audio", "video")  # the reference demo's order: audio tokens, then video tokens


@pytest.fixture(scope="module")
def params():
    return vref.random_params(CFG, seed=0)


def _equal_trees(a, b):
    fa, fb = tree_paths.flatten(a), tree_paths.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), k


def _buffer_keys(equip_audio):
    return set(vref.reference_buffers(CFG, equip_audio))


# ------------------------------------------------------------------------------------------ layout

def test_key_map_is_the_released_layout():
    keys = {e.key: e.shape for es in vl.key_map(CFG).values() for e in es}
    h, w = CFG.video_qformer.hidden_size, CFG.video_qformer.encoder_width
    # Cross-attention in every layer of the video/audio Q-Formers, query FFN only (text FFN set to None).
    for i in range(CFG.video_qformer.num_layers):
        p = f"video_Qformer.bert.encoder.layer.{i}."
        assert keys[p + "crossattention.self.key.weight"] == (h, w)
        assert keys[p + "attention.self.query.weight"] == (h, h)
        assert keys[p + "intermediate_query.dense.weight"] == (CFG.video_qformer.intermediate_size, h)
        assert p + "output_query.LayerNorm.bias" in keys
        assert not any(k.startswith((p + "intermediate.", p + "output.")) for k in keys)
    assert keys["video_Qformer.bert.embeddings.LayerNorm.weight"] == (h,)
    assert keys["video_query_tokens"] == (1, CFG.video_qformer.num_query_tokens, h)
    assert keys["video_frame_position_embedding.weight"] == (CFG.max_frame_pos, w)
    assert keys["llama_proj.weight"] == (CFG.llama.hidden_size, h)
    assert keys["audio_position_embedding.weight"] == (CFG.max_audio_pos, CFG.audio_qformer.encoder_width)
    assert keys["audio_llama_proj.bias"] == (CFG.llama.hidden_size,)
    assert keys["llama_model.model.layers.1.mlp.down_proj.weight"] == (CFG.llama.hidden_size,
                                                                       CFG.llama.intermediate_size)
    assert "audio_encoder.modality_trunks.audio.blocks.0.attn.bias_k" in keys
    assert "audio_encoder.modality_trunks.vision.blocks.0.attn.in_proj_weight" in keys
    # The HF Q-Former a PyTorch user would build has exactly these keys after renaming.
    hf = vref.heads("video", CFG.video_qformer, CFG.max_frame_pos, CFG.llama.hidden_size).state_dict()
    assert set(hf) == {e.key for c in vl.BRANCHES["video"] for e in vl.component_entries(CFG, c)}


def test_round_trip_every_component_bit_exact(params):
    sd = vl.state_dict_from_params(params, CFG, vl.available_components(CFG), dtype=None)
    back, report = vl.params_from_state_dict(sd, CFG)
    assert report.notes == (f"components: {', '.join(vl.COMPONENTS)}",)
    # With the audio tower exported, ImageBind's audio logit scale is its param, not a buffer.
    scale = "audio_encoder.modality_postprocessors.audio.1.log_logit_scale"
    assert not report.unmatched and set(report.ignored) == _buffer_keys(True) - {scale}
    _equal_trees(back, params)
    # bf16 stays bit exact (no float32 detour).
    bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params)
    sd = vl.state_dict_from_params(bf16, CFG, vl.available_components(CFG), dtype=None, include_buffers=False)
    back, _ = vl.params_from_state_dict(sd, CFG, dtype=ml_dtypes.bfloat16)
    _equal_trees(back, bf16)


def test_export_file_is_what_the_reference_saves(tmp_path, params):
    path = tmp_path / "heads.pth"
    vl.save_video_llama(path, params, CFG, vl.BRANCHES["video"])
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"model", "optimizer", "config", "scaler", "epoch"}
    assert obj["config"]["model"]["equip_audio_branch"] is False
    sd = obj["model"]
    video = [e.key for c in vl.BRANCHES["video"] for e in vl.component_entries(CFG, c)]
    assert set(sd) == set(video) | _buffer_keys(False)
    # The reference's state_dict order: its own query tokens, then modules in registration order.
    assert list(sd)[:4] == ["video_query_tokens", "Qformer.bert.embeddings.position_ids",
                            "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq",
                            "llama_model.model.layers.1.self_attn.rotary_emb.inv_freq"]
    assert all(sd[k].dtype == torch.float32 for k in video)
    for k, v in vref.reference_buffers(CFG, False).items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    back, report = vl.load_video_llama(path, CFG, strict=True)
    assert set(report.ignored) == _buffer_keys(False)
    _equal_trees(back, {k: params[k] for k in ("video_qformer", "video_frame_position_embedding", "llama_proj")})
    # The audio branch brings the reference's audio-branch buffers.
    vl.save_video_llama(tmp_path / "audio.pth", params, CFG, vl.BRANCHES["audio"])
    sd = torch.load(tmp_path / "audio.pth", weights_only=True)["model"]
    audio = {e.key for c in vl.BRANCHES["audio"] for e in vl.component_entries(CFG, c)}
    assert set(sd) == audio | _buffer_keys(True)


# ------------------------------------------------------------------------------------------ vs PyTorch

def _batch(seed=0, length=24):
    rng = np.random.default_rng(seed)
    k = CFG.num_media_tokens(MEDIA)
    media_mask = np.zeros((B, length), bool)
    media_mask[0, 2:2 + k] = True
    media_mask[1, 5:5 + k] = True
    return {
        "frames": jnp.asarray(rng.normal(size=(B, T, CFG.vit.img_size, CFG.vit.img_size, 3)), jnp.float32),
        "audio": jnp.asarray(rng.normal(size=(B, M, *CFG.imagebind_audio.input_shape)), jnp.float32),
        "input_ids": jnp.asarray(rng.integers(3, CFG.llama.vocab_size, (B, length)), jnp.int32),
        "attention_mask": jnp.ones((B, length), jnp.int32),
        "media_mask": jnp.asarray(media_mask),
    }


@jax.jit
def _flax_outputs(params, batch):
    """(image Q-Former features [B,T,N,W], ImageBind audio embeddings [B,M,E], soft tokens, logits)."""
    model, v = VideoLlama(CFG), {"params": params}
    frames, audio = batch["frames"], batch["audio"]
    img = model.apply(v, frames.reshape(B * T, *frames.shape[2:]),
                      method=lambda m, f: m.image_encoder(f, deterministic=True))
    aud = model.apply(v, audio.reshape(B * M, *audio.shape[2:]),
                      method=lambda m, a: m.audio_encoder(a, deterministic=True))
    soft = model.apply(v, batch, MEDIA, method=VideoLlama.encode_media)
    logits = model.apply(v, batch, MEDIA).logits
    return img.reshape(B, T, *img.shape[1:]), aud.reshape(B, M, -1), soft, logits


def test_exported_heads_and_llama_match_pytorch(tmp_path, params):
    from transformers import LlamaForCausalLM

    path = tmp_path / "video_llama.pth"
    vl.save_video_llama(path, params, CFG)  # both branches' heads
    sd = torch.load(path, weights_only=True)["model"]
    video = vref.heads("video", CFG.video_qformer, CFG.max_frame_pos, CFG.llama.hidden_size, seed=1)
    audio = vref.heads("audio", CFG.audio_qformer, CFG.max_audio_pos, CFG.llama.hidden_size, seed=2)
    used = video.load(sd) | audio.load(sd)
    assert set(sd) - used == _buffer_keys(True)  # nothing a strict=False load would drop but buffers

    batch = _batch()
    img, aud, soft, logits = (np.asarray(x) for x in _flax_outputs(params, batch))
    expected = np.concatenate([audio(aud), video(img)], axis=1)
    err = assert_close(soft, expected, atol=1e-4, what="soft tokens vs torch heads")
    print(f"soft tokens max abs err {err:.2e}")

    hf_dir = hf_llama.save_hf(params["llama"], CFG.llama, tmp_path / "hf", progress=False)
    model = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = torch.as_tensor(np.where(np.asarray(batch["media_mask"]), 0, np.asarray(batch["input_ids"])),
                          dtype=torch.long)
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        mask = torch.from_numpy(np.array(batch["media_mask"]))
        embeds[mask] = torch.from_numpy(expected).reshape(-1, expected.shape[-1])
        hf_logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits.numpy()
    err = assert_close(logits, hf_logits, atol=1e-4, what="logits vs HF with spliced soft tokens")
    print(f"logits max abs err {err:.2e} (|logits| up to {np.abs(hf_logits).max():.1f})")


def test_released_checkpoint_imports_and_matches_pytorch(tmp_path, rng):
    video = vref.heads("video", CFG.video_qformer, CFG.max_frame_pos, CFG.llama.hidden_size, seed=3)
    audio = vref.heads("audio", CFG.audio_qformer, CFG.max_audio_pos, CFG.llama.hidden_size, seed=4)
    vpath, apath = tmp_path / "finetune-vision.pth", tmp_path / "finetune-audiobranch.pth"
    written = vref.released_checkpoint(vpath, [video], CFG, equip_audio=False)
    vref.released_checkpoint(apath, [audio], CFG, equip_audio=True)

    p_video, report = vl.load_video_llama(vpath, CFG, strict=True)
    assert report.notes == ("components: llama_proj, video_frame_position_embedding, video_qformer",)
    assert set(report.ignored) == _buffer_keys(False) and set(report.loaded) | set(report.ignored) == set(written)
    p_audio, report = vl.load_video_llama(apath, CFG, strict=True)
    assert set(p_audio) == {"audio_qformer", "audio_llama_proj", "audio_position_embedding"}
    assert "ImageBind fixed logit-scale buffer" in report.ignored[
        "audio_encoder.modality_postprocessors.audio.1.log_logit_scale"]

    for heads, p, qcfg, feats in [
            (video, p_video, CFG.video_qformer, rng.normal(size=(B, T, 8, CFG.video_qformer.encoder_width))),
            (audio, p_audio, CFG.audio_qformer, rng.normal(size=(B, M, CFG.audio_qformer.encoder_width)))]:
        name = heads.branch
        pos = p[f"{name}_frame_position_embedding" if name == "video" else "audio_position_embedding"]
        proj = p["llama_proj" if name == "video" else "audio_llama_proj"]
        x = feats + (pos[: feats.shape[1]][None, :, None] if feats.ndim == 4 else pos[: feats.shape[1]][None])
        x = x.reshape(B, -1, x.shape[-1]).astype(np.float32)
        hidden = QFormer(qcfg).apply({"params": p[f"{name}_qformer"]}, jnp.asarray(x))
        ours = np.asarray(hidden) @ proj["kernel"] + proj["bias"]
        err = assert_close(ours, heads(feats), atol=1e-4, what=f"{name} heads from a released-style checkpoint")
        print(f"{name} heads max abs err {err:.2e}")

    # MiniGPT-4's projection file: llama_proj (+ buffers) only.
    minigpt4 = {k: v for k, v in written.items() if k.startswith("llama_proj.") or vl.is_buffer(k)}
    common.save_state_dict(tmp_path / "minigpt4.pth", minigpt4, wrap=True)
    p, report = vl.load_video_llama(tmp_path / "minigpt4.pth", CFG, strict=True)
    assert list(p) == ["llama_proj"] and report.notes == ("components: llama_proj",)


# ------------------------------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def heads_sd(params):
    return vl.state_dict_from_params(params, CFG)


def test_missing_shape_other_model_and_unmatched_keys_are_named(heads_sd):
    key = "video_Qformer.bert.encoder.layer.1.crossattention.self.value.weight"
    with pytest.raises(common.CheckpointError, match=r"Video-LLaMA video_qformer: checkpoint is missing 1 "
                                                     r"key\(s\): " + re.escape(key)):
        vl.params_from_state_dict({k: v for k, v in heads_sd.items() if k != key}, CFG)
    wrong = {**heads_sd, "llama_proj.weight": np.zeros((80, 32), np.float32)}
    with pytest.raises(common.CheckpointError, match=re.escape("'llama_proj.weight' has shape (80, 32), "
                                                               "expected (64, 32)")):
        vl.params_from_state_dict(wrong, CFG)
    other = {"modality_trunks.audio.blocks.0.attn.in_proj_weight": np.zeros((3, 3), np.float32),
             "Qformer.bert.embeddings.position_ids": np.zeros((1, 512), np.int64)}
    with pytest.raises(common.CheckpointError, match=r"not a Video-LLaMA checkpoint.*starts? with: "
                                                     r"modality_trunks\.audio\.blocks\.0\.attn\.in_proj_weight"):
        vl.params_from_state_dict(other, CFG)
    no_audio = CFG.replace(audio_qformer=None, imagebind_audio=None, imagebind_vision=None)
    audio_only = {k: v for k, v in heads_sd.items() if k.startswith(("audio_", "Qformer."))}
    with pytest.raises(common.CheckpointError, match="holds audio-branch keys but this config has no audio branch"):
        vl.params_from_state_dict(audio_only, no_audio)
    extra = {**heads_sd, "video_Qformer.bert.encoder.layer.2.attention.self.query.weight": np.zeros((32, 32)),
             "mystery": np.zeros(1)}
    _, report = vl.params_from_state_dict(extra, CFG)
    assert report.unmatched == ("video_Qformer.bert.encoder.layer.2.attention.self.query.weight", "mystery")
    with pytest.raises(common.CheckpointError, match=r"2 unexpected key\(s\): video_Qformer"):
        common.check_strict(report, True, "extra.pth")
    with pytest.raises(ValueError, match="component 'audio_qformer' is not part of this VideoLlamaConfig"):
        vl.component_entries(no_audio, "audio_qformer")


def test_unreadable_unsafe_and_truncated_files(tmp_path, heads_sd):
    good = tmp_path / "good.pth"
    common.save_state_dict(good, heads_sd, wrap=True)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(common.CheckpointError, match=r"truncated\.pth: not a readable PyTorch weights file"):
        vl.load_video_llama(truncated, CFG)

    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(64, 32)}, "hook": Payload()}, evil)
    with pytest.raises(common.UnsafeCheckpointError, match=r"evil\.pth: refused: loading it needs arbitrary "
                                                            r"unpickling \(the pickle asks for GLOBAL (builtins\.)?print"):
        vl.load_video_llama(evil, CFG)
    with pytest.raises(FileNotFoundError, match="absent.pth: checkpoint file does not exist"):
        vl.load_video_llama(tmp_path / "absent.pth", CFG)


def test_failed_export_leaves_destination_untouched(tmp_path, params, monkeypatch):
    dest = tmp_path / "out.pth"
    dest.write_bytes(b"previous")
    with pytest.raises(common.CheckpointError, match="params hold none of the trainable Video-LLaMA subtrees"):
        vl.save_video_llama(dest, {"llama": params["llama"]}, CFG)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        vl.save_video_llama(dest, params, CFG)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth"]


def test_scan_layers_params_round_trip_stacked(params):
    """A scan_layers model keeps LLaMA layers / EVA blocks stacked: import stacks, export unstacks,
    and the file is the one the unrolled model writes."""
    import dataclasses

    scan = CFG.replace(llama=dataclasses.replace(CFG.llama, scan_layers=True),
                       vit=dataclasses.replace(CFG.vit, scan_layers=True))
    stacked = vref.random_params(scan, seed=8)  # the scanned model's own tree
    assert "layers" in stacked["llama"] and "blocks" in stacked["image_encoder"]["visual_encoder"]
    sd = vl.state_dict_from_params(stacked, scan, vl.available_components(scan), dtype=None)
    assert sd.keys() == vl.state_dict_from_params(params, CFG, vl.available_components(CFG), dtype=None).keys()
    back, _ = vl.params_from_state_dict(sd, scan)
    _equal_trees(back, stacked)
    unrolled, _ = vl.params_from_state_dict(sd, CFG)
    np.testing.assert_array_equal(unrolled["llama"]["layers_1"]["mlp"]["down_proj"]["kernel"],
                                  stacked["llama"]["layers"]["mlp"]["down_proj"]["kernel"][1])
    np.testing.assert_array_equal(unrolled["image_encoder"]["visual_encoder"]["blocks_1"]["fc1"]["kernel"],
                                  stacked["image_encoder"]["visual_encoder"]["blocks"]["fc1"]["kernel"][1])
