"""ImageBind audio/vision towers: parity with a PyTorch reference built from ImageBind's own torch
primitives (keyed like `imagebind_huge.pth`), importer round trip and errors, sharding, drop path."""
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_close

from vllama_jax import sharding
from vllama_jax.convert import imagebind as conv
from vllama_jax.models.imagebind import (ImageBindAudio, ImageBindAudioConfig, ImageBindVision,
                                         ImageBindVisionConfig)

tnn = torch.nn


# ----------------------------------------------------------------------------- torch reference
# The modules below use the torch layers ImageBind's imagebind_model.py instantiates, in the same
# module tree, so `state_dict()` has the checkpoint's key names.

class RefMlp(tnn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = tnn.Linear(d, hidden), tnn.GELU(), tnn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(tnn.Module):
    """BlockWithMasking: pre-LN (eps 1e-6) nn.MultiheadAttention and MLP, on [L, B, D]."""

    def __init__(self, d, heads, bias_kv):
        super().__init__()
        self.attn = tnn.MultiheadAttention(d, heads, bias=True, add_bias_kv=bias_kv)
        self.norm_1, self.norm_2 = tnn.LayerNorm(d, eps=1e-6), tnn.LayerNorm(d, eps=1e-6)
        self.mlp = RefMlp(d, 4 * d)

    def forward(self, x):
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=None)[0]
        return x + self.mlp(self.norm_2(x))


class RefTrunk(tnn.Module):
    def __init__(self, d, heads, blocks, bias_kv, pre_ln):
        super().__init__()
        self.pre_transformer_layer = tnn.Sequential(tnn.LayerNorm(d, eps=1e-6) if pre_ln else tnn.Identity())
        self.blocks = tnn.Sequential(*[RefBlock(d, heads, bias_kv) for _ in range(blocks)])

    def forward(self, tokens):
        x = self.pre_transformer_layer(tokens).transpose(0, 1)  # b l d -> l b d
        return self.blocks(x).transpose(0, 1)


class RefPadIm2Video(tnn.Module):
    def forward(self, x):
        return x.unsqueeze(2).repeat(1, 1, 2, 1, 1) if x.ndim == 4 else x


class RefStem(tnn.Module):
    """PatchEmbedGeneric: proj, flatten(2).transpose(1, 2), optional norm_layer."""

    def __init__(self, proj, norm=None):
        super().__init__()
        self.proj, self.norm_layer = proj, norm

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm_layer(x) if self.norm_layer is not None else x


class RefPosHelper(tnn.Module):
    def __init__(self, tokens, d):
        super().__init__()
        self.pos_embed = tnn.Parameter(torch.zeros(1, tokens, d))


class RefPreprocessor(tnn.Module):
    def __init__(self, stem, tokens, d):
        super().__init__()
        self.rgbt_stem = stem
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, d))
        self.pos_embedding_helper = RefPosHelper(tokens, d)

    def forward(self, x):
        t = self.rgbt_stem(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.pos_embedding_helper.pos_embed


class RefSelect(tnn.Module):
    def forward(self, x):
        return x[:, 0, ...]


class RefNormalize(tnn.Module):
    def forward(self, x):
        return tnn.functional.normalize(x, dim=-1, p=2)


class RefLogitScale(tnn.Module):
    def __init__(self, init):
        super().__init__()
        self.register_buffer("log_logit_scale", torch.ones([]) * np.log(init))

    def forward(self, x):
        return torch.clip(self.log_logit_scale.exp(), max=100) * x


class RefImageBind(tnn.Module):
    """Audio + vision (+ a stand-in text head whose keys the importer must report as ignored)."""

    def __init__(self, a: ImageBindAudioConfig, v: ImageBindVisionConfig):
        super().__init__()
        audio_stem = RefStem(tnn.Conv2d(1, a.embed_dim, a.kernel_size, a.stride, bias=False),
                             tnn.LayerNorm(a.embed_dim))
        kernel = (v.num_frames, v.patch_size, v.patch_size)
        vision_stem = RefStem(tnn.Sequential(
            RefPadIm2Video(), tnn.Conv3d(3, v.embed_dim, kernel, stride=kernel, bias=False)))
        self.modality_preprocessors = tnn.ModuleDict({
            "vision": RefPreprocessor(vision_stem, v.num_tokens, v.embed_dim),
            "audio": RefPreprocessor(audio_stem, a.num_tokens, a.embed_dim)})
        self.modality_trunks = tnn.ModuleDict({
            "vision": RefTrunk(v.embed_dim, v.num_heads, v.num_blocks, False, True),
            "audio": RefTrunk(a.embed_dim, a.num_heads, a.num_blocks, True, False)})
        head = lambda d, out: tnn.Sequential(tnn.LayerNorm(d, eps=1e-6), RefSelect(),  # noqa: E731
                                             tnn.Linear(d, out, bias=False))
        self.modality_heads = tnn.ModuleDict({
            "vision": head(v.embed_dim, v.out_embed_dim), "audio": head(a.embed_dim, a.out_embed_dim),
            "text": tnn.Sequential(tnn.LayerNorm(8, eps=1e-6), tnn.Linear(8, 4, bias=False))})
        self.modality_postprocessors = tnn.ModuleDict({
            "vision": RefNormalize(),
            "audio": tnn.Sequential(RefNormalize(), RefLogitScale(20.0))})

    def forward(self, x, modality, pooled=False):
        t = self.modality_trunks[modality](self.modality_preprocessors[modality](x))
        head = self.modality_heads[modality]
        if pooled:
            return head[:-1](t)
        return self.modality_postprocessors[modality](head(t))


AUDIO = ImageBindAudioConfig.preset("tiny")
VISION = ImageBindVisionConfig.preset("tiny")


def _randomize(model: tnn.Module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if ("norm" in name or name.endswith(".0.weight")) and p.ndim == 1 else noise)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomize(RefImageBind(AUDIO, VISION))
    path = tmp_path_factory.mktemp("imagebind") / "imagebind_tiny.pth"
    torch.save(model.state_dict(), path)
    weights = conv.import_imagebind(path, AUDIO, VISION)
    return model, path, weights


def _torch(model, x, modality, pooled=False):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x)), modality, pooled).numpy()


# ----------------------------------------------------------------------------- parity

def test_audio_tower_matches_torch(reference, rng):
    model, _, weights = reference
    fbank = rng.standard_normal((3, 1, 128, 204)).astype(np.float32)
    pooled, emb = jax.jit(partial(ImageBindAudio(AUDIO).apply, return_pooled=True))(
        {"params": weights.audio}, jnp.asarray(fbank))
    err = assert_close(emb, _torch(model, fbank, "audio"), atol=1e-4, what="audio embedding")
    err_pooled = assert_close(pooled, _torch(model, fbank, "audio", pooled=True), atol=1e-4,
                              what="audio pooled cls feature")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 20.0, rtol=1e-5)
    assert emb.shape == (3, AUDIO.out_embed_dim)
    print(f"audio parity max abs err: embedding {err:.2e}, pooled {err_pooled:.2e}")


def test_vision_tower_matches_torch(reference, rng):
    model, _, weights = reference
    images = rng.standard_normal((2, VISION.image_size, VISION.image_size, 3)).astype(np.float32)
    apply = jax.jit(ImageBindVision(VISION).apply)
    emb = apply({"params": weights.vision}, jnp.asarray(images))
    ref = _torch(model, images.transpose(0, 3, 1, 2), "vision")
    err = assert_close(emb, ref, atol=1e-4, what="vision embedding")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    # A 2-frame clip of the same image repeated is what PadIm2Video makes of an image.
    clip = np.repeat(images[:, None], 2, axis=1)
    assert_close(apply({"params": weights.vision}, jnp.asarray(clip)), emb,
                 atol=1e-6, what="image vs repeated 2-frame clip")
    print(f"vision parity max abs err: {err:.2e}")


def test_wrong_input_shapes_are_named():
    with pytest.raises(ValueError, match=r"fbank must be \[N, 1, 128, 204\].*\(2, 128, 204\)"):
        ImageBindAudio(AUDIO).init(jax.random.key(0), jnp.zeros((2, 128, 204)))
    with pytest.raises(ValueError, match=r"images must be \[N, 42, 42, 3\].*\(2, 3, 42, 42\)"):
        ImageBindVision(VISION).init(jax.random.key(0), jnp.zeros((2, 3, 42, 42)))


# ----------------------------------------------------------------------------- importer

def test_import_reports_other_modalities(reference):
    _, _, weights = reference
    assert weights.ignored == ("modality_heads.text.0.bias", "modality_heads.text.0.weight",
                               "modality_heads.text.1.weight")
    only_audio = conv.import_imagebind(reference[1], AUDIO, VISION, modalities=("audio",))
    assert only_audio.vision is None
    assert any(k.startswith("modality_trunks.vision.") for k in only_audio.ignored)


def test_round_trip_is_bit_exact(reference):
    model, _, weights = reference
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    back = {**conv.audio_state_dict_from_params(weights.audio, AUDIO),
            **conv.vision_state_dict_from_params(weights.vision, VISION)}
    relevant = {k: v for k, v in sd.items() if not k.startswith("modality_heads.text")}
    assert sorted(back) == sorted(relevant)
    for k, v in relevant.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k
    again = conv.audio_params_from_state_dict(back, AUDIO)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again, weights.audio)
    # and the Flax tree has exactly the model's structure
    shapes = jax.eval_shape(ImageBindAudio(AUDIO).init, jax.random.key(0), jnp.zeros((1, 1, 128, 204)))
    assert jax.tree.structure(nn.meta.unbox(shapes)["params"]) == jax.tree.structure(weights.audio)


def test_save_imagebind_writes_a_loadable_file(reference, tmp_path):
    _, _, weights = reference
    path = tmp_path / "out.pth"
    conv.save_imagebind(path, weights.audio, weights.vision, AUDIO, VISION)
    again = conv.import_imagebind(path, AUDIO, VISION)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again.vision, weights.vision)


def test_import_errors_name_key_and_shapes(reference, tmp_path):
    model, _, _ = reference
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    missing = dict(sd)
    del missing["modality_trunks.audio.blocks.1.attn.bias_k"]
    with pytest.raises(conv.ImageBindCheckpointError,
                       match=r"modality_trunks\.audio\.blocks\.1\.attn\.bias_k \(1, 1, 32\)"):
        conv.audio_params_from_state_dict(missing, AUDIO)
    wrong = dict(sd, **{"modality_heads.vision.2.weight": np.zeros((24, 16), np.float32)})
    with pytest.raises(conv.ImageBindCheckpointError,
                       match=r"modality_heads\.vision\.2\.weight'? has shape \(24, 16\).*\(24, 32\)"):
        conv.vision_params_from_state_dict(wrong, VISION)
    one_block = ImageBindAudioConfig.preset("tiny", num_blocks=1)
    with pytest.raises(conv.ImageBindCheckpointError, match=r"modality_trunks\.audio\.blocks\.1\."):
        conv.audio_params_from_state_dict(sd, one_block)
    with pytest.raises(conv.ImageBindCheckpointError, match="does not exist"):
        conv.import_imagebind(tmp_path / "nope.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a zip or pickle" * 10)
    with pytest.raises(conv.ImageBindCheckpointError, match="broken.pth"):
        conv.import_imagebind(broken)


# ----------------------------------------------------------------------------- training behaviour

def test_drop_path_only_in_training(reference, rng):
    _, _, weights = reference
    fbank = jnp.asarray(rng.standard_normal((4, 1, 128, 204)).astype(np.float32))
    variables = {"params": weights.audio}

    @partial(jax.jit, static_argnums=(3, 4))
    def apply(variables, x, key, deterministic, drop_path):
        tower = ImageBindAudio(ImageBindAudioConfig.preset("tiny", drop_path=drop_path))
        return tower.apply(variables, x, deterministic=deterministic, rngs={"dropout": key})

    run = lambda seed, *static: apply(variables, fbank, jax.random.key(seed), *static)  # noqa: E731
    eval_out = run(0, True, 0.5)
    train = [run(s, False, 0.5) for s in (1, 2)]
    assert float(jnp.max(jnp.abs(train[0] - eval_out))) > 1e-3
    assert float(jnp.max(jnp.abs(train[0] - train[1]))) > 1e-3
    np.testing.assert_array_equal(run(1, False, 0.0), eval_out)


def test_sharded_forward_matches(reference, rng):
    _, _, weights = reference
    mesh = sharding.make_mesh((2, 2, 2))
    tower = ImageBindAudio(AUDIO)
    fbank = rng.standard_normal((4, 1, 128, 204)).astype(np.float32)
    boxed = jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, 1, 128, 204)))["params"]
    shardings = sharding.param_shardings(boxed, mesh)
    params = jax.device_put(weights.audio, shardings)
    fn = jax.jit(sharding.with_rules(lambda p, x: tower.apply({"params": p}, x)),
                 in_shardings=(shardings, sharding.batch_sharding(mesh, 4)))
    with jax.set_mesh(mesh):
        out = fn(params, sharding.shard_batch(fbank, mesh))
    assert_close(out, jax.jit(tower.apply)({"params": weights.audio}, jnp.asarray(fbank)), atol=1e-5,
                 what="sharded vs single-device")


# ----------------------------------------------------------------------------- real size

@pytest.mark.slow
@pytest.mark.ci
def test_real_size_audio_tower_forward(rng):
    cfg = ImageBindAudioConfig.preset("imagebind_audio_huge")
    tower = ImageBindAudio(cfg)
    fbank = jnp.asarray(rng.standard_normal((8, 1, 128, 204)).astype(np.float32))
    params = jax.jit(tower.init)(jax.random.key(0), fbank[:1])["params"]
    params = nn.meta.unbox(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    fwd = jax.jit(lambda p, x: tower.apply({"params": p}, x))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(params, fbank))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fwd(params, fbank))
    t_run = time.perf_counter() - t0
    assert out.shape == (8, 1024)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 20.0, rtol=1e-5)
    print(f"imagebind_audio_huge: {n_params / 1e6:.1f}M params, 8 clips: compile+run {t_first:.1f}s, "
          f"run {t_run:.2f}s")


@pytest.mark.slow
@pytest.mark.ci
def test_real_size_vision_tower_forward(rng):
    cfg = ImageBindVisionConfig.preset("imagebind_vision_huge")
    tower = ImageBindVision(cfg)
    images = jnp.asarray(rng.standard_normal((1, 224, 224, 3)).astype(np.float32))
    params = nn.meta.unbox(jax.jit(tower.init)(jax.random.key(0), images)["params"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    t0 = time.perf_counter()
    out = jax.block_until_ready(jax.jit(lambda p, x: tower.apply({"params": p}, x))(params, images))
    assert out.shape == (1, 1024)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    print(f"imagebind_vision_huge: {n_params / 1e6:.1f}M params, 1 image compile+run "
          f"{time.perf_counter() - t0:.1f}s")
