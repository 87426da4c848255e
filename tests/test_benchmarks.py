"""The benchmark harness: batches shaped like the loader's, the peak probe, the result table."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import run, train_step  # noqa: E402


def test_synthetic_batch_matches_the_model_and_loader_layout():
    configs = train_step.bench_configs()
    small = configs["small"]
    assert small.llama.hidden_size >= 512 and small.vit.img_size == 224 and small.vit.patch_size == 14
    for name in ("tiny", "tiny_224", "small"):
        work = train_step.WORKLOADS[name]
        batch = train_step.synthetic_batch(configs[name], work)
        k = configs[name].num_media_tokens(work.media)
        assert batch["frames"].shape == (work.batch_size, work.num_frames, configs[name].vit.img_size,
                                         configs[name].vit.img_size, 3)
        assert (batch["media_mask"].sum(1) == k).all()
        assert (batch["targets"][batch["media_mask"]] == -100).all()
    with pytest.raises(ValueError, match="media tokens"):
        train_step.synthetic_batch(small, train_step.Workload("x", 1, 1, seq_len=16))


def test_matmul_peak_is_a_positive_rate():
    assert train_step.matmul_peak(n=64, rounds=2, chain=2) > 0


def test_table_renders_every_part_and_marks_failures():
    results = {
        "train_step": {"returncode": 0, "result": [{
            "config": "small", "batch_size": 2, "num_frames": 8, "seq_len": 128, "compile_s": 40.0,
            "median_s": 5.0, "examples_per_s": 0.4, "gflop_per_s": 24.0, "peak_gflop_per_s": 40.0,
            "fraction_of_peak": 0.6, "fraction_of_peak_best": 0.62}]},
        "feature_cache": {"returncode": 0, "result": [{
            "config": "tiny_224", "batch_size": 4, "num_frames": 8, "uncached_s_per_step": 0.3,
            "cached_s_per_step": 0.01, "speedup": 30.0, "loss_abs_diff": 0.0, "first_step_loss_uncached": 5.5}]},
        "loader": {"returncode": "timeout"},
    }
    text = run.table(results)
    assert "60.0% (best step 62.0%)" in text and "30.0x" in text
    assert "FAILED (timeout)" in text
    assert "decode" in text  # the hook line when decode did not run


def test_table_shows_the_loader_against_the_step_of_the_same_run():
    step = {"config": "tiny_224", "loader_examples_per_s": 60.0, "step_examples_per_s": 12.0,
            "step_fed_examples_per_s": 10.0, "loader_over_step": 5.0, "fed_over_fixed": 10 / 12}
    results = {"loader": {"returncode": 0, "result": {
        "examples_per_s": {"read_threads=2,workers=0": 55.0}, "batch_size": 8, "num_frames": 8,
        "image_size": 224, "against_step": step}}}
    text = run.table(results)
    assert "55.0 examples/s" in text
    assert "60.0 / 12.0 examples/s (5.00x)" in text and "10.0 / 12.0 examples/s (0.83)" in text


def test_table_shows_packing_and_pytorch_rows():
    mib = 2 ** 20
    results = {
        "packing": {"returncode": 0, "result": {
            "config": "small", "batch_size": 4, "seq_len": 512, "media_per_batch": 6, "cap_tokens_per_step": 1.56,
            "step_s": {"padded": 2.0, "packed": 2.2, "padded_full_logits": 2.4},
            "stream_padded_tokens": 1300.0, "stream_packed_tokens": 1800.0, "packed_over_padded_tokens_per_s": 1.26,
            "memory_bytes": {"padded": 100 * mib, "packed": 110 * mib, "padded_full_logits": 400 * mib},
            "packed_fraction_of_peak": 0.5, "packed_gflop_per_s": 60.0, "peak_gflop_per_s": 120.0,
            "full_logits_over_chunked_step_s": 1.2}},
        "torch_step": {"returncode": 0, "result": {
            "config": "small", "batch_size": 2, "num_frames": 8, "seq_len": 128, "eval_loss_abs_diff": 1e-6,
            "eval_loss_ours": 10.4, "step_s": {"torch": 1.5, "ours": 1.4, "ours_cached": 0.4},
            "torch_over_ours": 1.07, "torch_over_ours_cached": 3.75}},
    }
    text = run.table(results)
    assert "1.26x (tokens/step cap 1.56x)" in text and "6 media slots" in text and "100 / 110 MiB" in text and "400 / 100 MiB (time 1.20x)" in text
    assert "50.0% (60 of 120 GFLOP/s)" in text
    assert "1500 / 1400 / 400 ms" in text and "1.07x (cached: 3.8x)" in text


@pytest.mark.slow
@pytest.mark.ci
def test_loader_against_step_feeds_the_loaders_batches_to_the_step(tmp_path):
    import dataclasses

    from benchmarks import loader_throughput
    from data_pipelines.loader import LoaderConfig

    paths = loader_throughput._write_shards(str(tmp_path), num_examples=8, num_shards=2)
    encoder = loader_throughput._encoder(str(tmp_path))
    base = dataclasses.replace(LoaderConfig.preset("stage1", batch_size=2, num_frames=4), read_threads=1)
    out = loader_throughput.against_step(paths, encoder, base, "tiny", rounds=1, batches=2, warmup=1)
    assert out["num_media_tokens"] == train_step.bench_configs()["tiny"].num_media_tokens(("video",))
    assert out["llama_vocab"] >= len(encoder.tokenizer)
    for key in ("loader_examples_per_s", "step_examples_per_s", "step_fed_examples_per_s"):
        assert out[key] > 0 and len(out["rounds"][key.removesuffix("_examples_per_s")]) == 1


def test_convert_rss_smoke(tmp_path):
    """benchmarks/convert_rss.py at tiny width: the children's peak RSS is read back (the real
    figures are the 7B-width rows in benchmarks/README.md) and the directories are gone after."""
    import json

    from benchmarks import convert_rss

    out = tmp_path / "rss.json"
    assert convert_rss.main(["--width", "tiny", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["checkpoint"]["tensors"] == 2 * 9 + 3
    for k in ("import", "export"):
        assert 50e6 < row[k]["peak_rss_bytes"] < 2e9
    assert not any((tmp_path / "w" / "tiny").glob("*"))
