"""Our train step vs a PyTorch train step of the same composite, same weights and batch, one process.

The PyTorch composite is assembled from the suite's reference modules (tests/lavis_reference.py,
tests/video_llama_reference.py) and `transformers.LlamaForCausalLM`, loaded with our params
through the converters (`convert.video_llama.state_dict_from_params`, `hf_llama.save_hf`):

  frames -> LAVIS EVA ViT -> ln_vision -> image Q-Former (HF Blip2QFormerModel) [frozen, no_grad]
         -> + frame position embedding -> video Q-Former -> llama_proj           [trained, AdamW]
         -> spliced at the media positions into LLaMA's input embeddings -> LLaMA loss (labels
            shifted by HF) [frozen weights, backward to the soft tokens]

which is the stage-1/2 vision-branch step of the original (`video_llama.py` forward + AdamW over
the video Q-Former, its query tokens, the position table and llama_proj). Their eval-mode losses
are compared first (same weights and batch: they must agree to float32 rounding), then both train
steps (dropout on in the trained Q-Former, as in training) are timed in alternating rounds. torch
runs at its default thread count (one per core), or with `--threads 1` both libraries on one thread:
on a loaded 2-core machine torch's OpenMP pool spin-waits for a busy core, which pinning avoids. Also timed: our step trained from the frozen-feature cache
(`vllama_jax.train.feature_cache`), which the original cannot do.

    python -m benchmarks.torch_step --config small
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_composite(config, params, workdir):
    """(step_fn(batch) -> loss float, eval_loss_fn(batch) -> float): the PyTorch composite."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import lavis_reference as ref
    import torch
    import video_llama_reference as vref
    from transformers import LlamaForCausalLM

    from vllama_jax.convert import hf_llama
    from vllama_jax.convert import video_llama as vl

    sd = vl.state_dict_from_params(params, config, ("visual_encoder", "ln_vision", "image_qformer") +
                                   vl.BRANCHES["video"], include_buffers=False)
    t = lambda k: torch.as_tensor(np.asarray(sd[k]))  # noqa: E731
    vit = ref.eva_vit(config.vit)
    vit.load_state_dict({k[len("visual_encoder."):]: t(k) for k in sd if k.startswith("visual_encoder.")},
                        strict=True)
    ln_vision = torch.nn.LayerNorm(config.vit.width, eps=1e-5)
    ln_vision.load_state_dict({"weight": t("ln_vision.weight"), "bias": t("ln_vision.bias")})
    qformer = ref.hf_qformer(config.image_qformer)
    qformer.load_state_dict({hf: t(ref.hf_to_lavis_key(hf)) for hf in qformer.state_dict()}, strict=True)
    query_tokens = t("query_tokens")
    video = vref.heads("video", config.video_qformer, config.max_frame_pos, config.llama.hidden_size)
    video.load(sd)
    hf_dir = hf_llama.save_hf(params["llama"], config.llama, os.path.join(workdir, "hf"), progress=False)
    llama = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    for module in (vit, ln_vision, qformer, llama):
        module.requires_grad_(False)
    opt = torch.optim.AdamW(list(video.parameters()), lr=1e-4, weight_decay=0.05)

    def loss_of(batch, train: bool):
        video.qformer.train(train)
        frames = batch["frames"]
        b, n_frames = frames.shape[:2]
        with torch.no_grad():
            images = frames.reshape(b * n_frames, *frames.shape[2:]).permute(0, 3, 1, 2)
            img = ln_vision(vit(images))
            img_mask = torch.ones(img.shape[:2], dtype=torch.long)
            q = qformer(query_embeds=query_tokens.expand(img.shape[0], -1, -1), encoder_hidden_states=img,
                        encoder_attention_mask=img_mask).last_hidden_state
            embeds = llama.model.embed_tokens(batch["input_ids"])
        x = q.reshape(b, n_frames, q.shape[1], q.shape[2]) + video.position(torch.arange(n_frames))[None, :, None, :]
        x = x.reshape(b, -1, x.shape[-1])
        hidden = video.qformer(query_embeds=video.query_tokens.expand(b, -1, -1), encoder_hidden_states=x,
                               encoder_attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).last_hidden_state
        soft = video.proj(hidden)
        embeds = embeds.masked_scatter(batch["media_mask"][..., None], soft.reshape(-1, soft.shape[-1]))
        return llama(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["targets"]).loss

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch, train=True)
        loss.backward()
        opt.step()
        return float(loss)

    def eval_loss(batch):
        with torch.no_grad():
            return float(loss_of(batch, train=False))

    return step, eval_loss


def torch_batch(batch):
    import torch

    out = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    out["input_ids"] = torch.where(out["media_mask"], 0, out["input_ids"]).long()
    out["attention_mask"] = out["attention_mask"].long()
    out["targets"] = out["targets"].long()
    return out


def measure(config_name: str, steps: int, rounds: int) -> dict:
    import jax
    import torch

    from benchmarks.common import load_average
    from benchmarks.train_step import WORKLOADS, bench_configs, build_runner, summarize, synthetic_batch
    from vllama_jax.models.video_llama import VideoLlama
    from vllama_jax.train import feature_cache
    from vllama_jax.train.video_llama_task import VideoLlamaTask

    config, work = bench_configs()[config_name], WORKLOADS[config_name]
    if config.imagebind_audio is not None or config.audio_qformer is not None:
        config = config.replace(audio_qformer=None, imagebind_audio=None, imagebind_vision=None)
    task = VideoLlamaTask(config, ("video",))
    params = jax.device_get(jax.jit(task.init_params)(jax.random.PRNGKey(0)))
    batch = synthetic_batch(config, work)
    ours_eval = float(jax.jit(lambda p, b: task.loss_fn(p, b, jax.random.PRNGKey(0), True)[0])(params, batch))
    with tempfile.TemporaryDirectory() as tmp:
        t_step, t_eval = torch_composite(config, params, tmp)
    tb = torch_batch(batch)
    torch_eval = t_eval(tb)

    outputs = feature_cache.outputs_for_media(("video",))
    cached_task = feature_cache.CachedFeatureTask(task, outputs)
    cached_batch = feature_cache.build_feature_dataset(task.model, {"params": params}, [batch], outputs,
                                                       method=VideoLlama.encode_media, method_args=(("video",),),
                                            keep=None, drop=feature_cache.RAW_MEDIA_KEYS).arrays
    ours = build_runner("ours", config, batch, params=params, task=task)
    cached = build_runner("ours_cached", config, cached_batch, params=cached_task._drop(params), task=cached_task)

    def run_torch(n):
        start = time.perf_counter()
        for _ in range(n):
            t_step(tb)
        return (time.perf_counter() - start) / n

    for r in (ours, cached):
        r.run(1)
    run_torch(1)
    times = {"ours": [], "ours_cached": [], "torch": []}
    for _ in range(rounds):
        times["ours"].append(ours.run(steps))
        times["torch"].append(run_torch(steps))
        times["ours_cached"].append(cached.run(steps))
    sec = {k: summarize(v)["median_s"] for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    return {
        "config": config_name, "batch_size": work.batch_size, "num_frames": work.num_frames,
        "seq_len": work.seq_len, "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "eval_loss_ours": ours_eval, "eval_loss_torch": torch_eval, "eval_loss_abs_diff": abs(ours_eval - torch_eval),
        "step_s": sec, "step_s_all": times,
        "torch_over_ours": sec["torch"] / sec["ours"], "torch_over_ours_cached": sec["torch"] / sec["ours_cached"],
        "step_s_best": best, "torch_over_ours_best_rounds": best["torch"] / best["ours"],
        "torch_over_ours_cached_best_rounds": best["torch"] / best["ours_cached"],
        "ours_step_gflop": (ours.flops or 0) / 1e9,
        "load_avg_1m": load_average(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("tiny_224", "small"), default="small")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="0: each library's default (torch: one per core); 1: torch and XLA single-threaded")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads == 1:
        # Before jax starts: XLA's CPU client reads its thread pools' size once.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
        import torch

        torch.set_num_threads(1)
    elif args.threads > 1:
        ap.error("--threads: 0 (defaults) or 1")
    result = measure(args.config, args.steps, args.rounds)
    result["threads"] = args.threads or "default"
    from benchmarks.common import show, write_json
    show(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
