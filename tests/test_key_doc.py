"""docs/CHECKPOINT_KEYS.md: generated from the key tables, up to date, and naming every key the PyTorch
reference modules have."""
import re
from pathlib import Path

import numpy as np

import lavis_reference
import llama_reference
import video_llama_reference as vref
from vllama_jax.convert import cli, common, key_doc
from vllama_jax.convert import video_llama as vl
from vllama_jax.models.video_llama import VideoLlamaConfig

DOC = Path(__file__).resolve().parent.parent / key_doc.DOC_PATH
CFG = VideoLlamaConfig.preset("tiny")


def test_doc_is_up_to_date(tmp_path):
    assert DOC.read_text() == key_doc.markdown(), (
        f"{key_doc.DOC_PATH} is stale: run `vllama-convert keys --out {key_doc.DOC_PATH}`")
    assert cli.main(["keys", "--out", str(tmp_path / "k.md")]) == 0
    assert (tmp_path / "k.md").read_text() == DOC.read_text()


def _doc_patterns() -> dict[str, re.Pattern]:
    """component -> one regex over the documented original keys of its section."""
    out, section = {}, None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            m = re.match(r"## (\w+) -> ", line)
            section = m.group(1) if m else None
        elif section and line.startswith("| `"):
            key = line.split("`")[1]
            out.setdefault(section, []).append(re.escape(key).replace(r"\{i\}", r"\d+"))
    return {name: re.compile("|".join(f"(?:{p})" for p in pats)) for name, pats in out.items()}


def test_doc_names_every_key_of_the_pytorch_references():
    torch = vref.torch
    keys = {}
    for branch, qcfg, pos in (("video", CFG.video_qformer, CFG.max_frame_pos),
                              ("audio", CFG.audio_qformer, CFG.max_audio_pos)):
        sd = vref.heads(branch, qcfg, pos, CFG.llama.hidden_size).state_dict()
        for c in vl.BRANCHES[branch]:
            heads = {e.key.split(".")[0] for e in vl.component_entries(CFG, c)}
            keys[c] = {k for k in sd if k.split(".")[0] in heads}
    hf = llama_reference.hf_model(seed=0, kv_heads=CFG.llama.num_kv_heads)
    keys["llama"] = {f"llama_model.{k}" for k in hf.state_dict()}
    eva = lavis_reference.eva_vit(CFG.vit)
    keys["visual_encoder"] = {f"visual_encoder.{k}" for k in eva.state_dict()}
    keys["ln_vision"] = {f"ln_vision.{k}" for k in torch.nn.LayerNorm(CFG.vit.width).state_dict()}
    qformer = lavis_reference.hf_qformer(CFG.image_qformer)
    keys["image_qformer"] = {lavis_reference.hf_to_lavis_key(k) for k in qformer.state_dict()} | {"query_tokens"}

    patterns = _doc_patterns()
    assert set(patterns) == set(vl.available_components(VideoLlamaConfig.preset(key_doc.DOC_PRESET)))
    ignored = vl._why_ignored(CFG)
    for name, got in keys.items():
        assert got, name
        undocumented = sorted(k for k in got if not patterns[name].fullmatch(k) and ignored(k) is None)
        assert not undocumented, (name, undocumented)
        # ... and each documented key of the section is one the reference has.
        documented = {e.key for e in vl.component_entries(CFG, name)}
        assert documented <= got, (name, sorted(documented - got))
        assert all(patterns[name].fullmatch(k) for k in documented), name


def test_layout_names_the_rearrangement():
    def entry(name, key):
        return next(e for e in vl.component_entries(CFG, name) if e.key == key)

    assert key_doc.layout(entry("llama_proj", "llama_proj.weight")) == "transposed"
    assert key_doc.layout(entry("llama_proj", "llama_proj.bias")) == "as is"
    assert key_doc.layout(entry("visual_encoder", "visual_encoder.blocks.0.attn.qkv.weight")) == \
        "split in 3 along dim 0 (one part per path), each transposed"
    patch = entry("visual_encoder", "visual_encoder.patch_embed.proj.weight")
    assert key_doc.layout(patch) == "axes permuted (2, 3, 1, 0), reshaped"
    a = np.random.default_rng(0).normal(size=patch.shape)
    np.testing.assert_array_equal(patch.to_flax(a)[0], a.transpose(2, 3, 1, 0).reshape(-1, a.shape[0]))
    # Real-size shapes come without allocating the tensors.
    big = common.transposed_entry("w", (32000, 4096), ("kernel",))
    assert key_doc._flax_shapes(big) == ((4096, 32000),)
    rows = {r.key: r for r in key_doc.rows(VideoLlamaConfig.preset("vicuna7b"))}
    assert rows["Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight"].layers == list(range(0, 12, 2))
    assert rows["visual_encoder.blocks.{i}.attn.qkv.weight"].flax_shapes == ((1408, 1408),) * 3


def test_real_size_shapes_are_the_released_ones():
    """Shapes the released files have (Video-LLaMA vicuna-7B heads, BLIP-2 with EVA ViT-g,
    imagebind_huge), as the documented key map states them."""
    rows = {r.key: r.torch_shape for r in key_doc.rows(VideoLlamaConfig.preset("vicuna7b"))}
    released = {
        "video_query_tokens": (1, 32, 768), "audio_query_tokens": (1, 8, 768),
        "video_frame_position_embedding.weight": (32, 768), "audio_position_embedding.weight": (8, 1024),
        "llama_proj.weight": (4096, 768), "audio_llama_proj.weight": (4096, 768),
        "video_Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight": (768, 768),
        "audio_Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight": (768, 1024),
        "Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight": (768, 1408),
        "visual_encoder.pos_embed": (1, 257, 1408), "visual_encoder.blocks.{i}.mlp.fc1.weight": (6144, 1408),
        "audio_encoder.modality_trunks.audio.blocks.{i}.attn.in_proj_weight": (2304, 768),
        "audio_encoder.modality_heads.audio.2.weight": (1024, 768),
        "llama_model.model.layers.{i}.mlp.gate_proj.weight": (11008, 4096),
    }
    assert {k: rows[k] for k in released} == released
