"""State-dict files without torch: `.safetensors` written and read by the converters' choke points."""
import numpy as np
import pytest

from vllama_jax.convert.common import CheckpointError, CheckpointNotFoundError, read_state_dict, save_state_dict


def test_safetensors_round_trip_is_exact_and_bad_files_are_named(tmp_path, rng):
    sd = {"visual_encoder.cls_token": rng.normal(size=(1, 1, 8)).astype(np.float32),
          "Qformer.bert.embeddings.LayerNorm.weight": rng.normal(size=(8,)).astype(np.float32),
          "query_tokens": rng.normal(size=(1, 4, 8)).astype(np.float32),
          "modality_postprocessors.audio.1.log_logit_scale": np.asarray(2.5, np.float32)}  # 0-d stays 0-d
    path = save_state_dict(tmp_path / "towers.safetensors", sd, wrap=True)
    back = read_state_dict(path)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k])
    with pytest.raises(FileExistsError):
        save_state_dict(path, sd, overwrite=False)

    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        read_state_dict(truncated)
    with pytest.raises(CheckpointNotFoundError, match="none.safetensors"):
        read_state_dict(tmp_path / "none.safetensors")
