"""Schedules against hand-computed tables, the weight-decay mask, AdamW parity with torch."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_close
from vllama_jax.train import optimizer, schedules

# init 1e-4, min 8e-5, warmup 1e-6 over 4 steps, 5 steps per epoch, 3 epochs (15 steps).
KW = dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=4, iters_per_epoch=5, max_epoch=3)
# warmup: 1e-6 + 99e-6 * s / 4 for s = 0..3: 1e-6, 25.75e-6, 50.5e-6, 75.25e-6
WARM = [1.0e-6, 25.75e-6, 50.5e-6, 75.25e-6]


def _table(fn, steps):
    sched = jax.jit(fn(**KW))
    return np.asarray([float(sched(jnp.asarray(s))) for s in steps])


def test_lavis_epoch_schedule_hand_table():
    # Epoch 0: warmup, reaching init_lr at step 4 and capped there.
    # Epoch 1: 8e-5 + 2e-5 * (1 + cos(pi/3)) / 2 = 9.5e-5; epoch 2: cos(2pi/3) -> 8.5e-5.
    expected = WARM + [1e-4] + [9.5e-5] * 5 + [8.5e-5] * 5
    got = _table(schedules.lavis_warmup_cosine, range(15))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_per_step_schedule_hand_table():
    # Warmup for steps < 4, then 8e-5 + 1e-5 * (1 + cos(pi * s / 15)).
    # s=4: cos(4pi/15) = 0.66913061 -> 9.66913061e-5; s=5: 9.5e-5; s=10: 8.5e-5; s=15: 8e-5.
    got = _table(schedules.per_step_warmup_cosine, [0, 1, 2, 3, 4, 5, 10, 15])
    expected = WARM + [9.66913061e-5, 9.5e-5, 8.5e-5, 8.0e-5]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_schedule_options_and_errors():
    # warmup_lr < 0 means "no warmup ramp": LAVIS starts at init_lr.
    sched = schedules.lavis_warmup_cosine(**{**KW, "warmup_lr": -1})
    assert float(sched(0)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        schedules.per_step_warmup_cosine(**{**KW, "iters_per_epoch": 0})

    class Cfg:
        lr_sched = "cosine_annealing"
    with pytest.raises(ValueError, match="unknown lr_sched"):
        schedules.make_schedule(Cfg)


def test_decay_mask_follows_runner_base():
    params = {
        "video_qformer": {"layer_0": {"query": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
                                      "LayerNorm_0": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)}}},
        "video_query_tokens": jnp.zeros((1, 8, 4)),
        "frame_position_embedding": {"embedding": jnp.zeros((8, 4))},
        "ln_vision": {"scale": jnp.zeros((4,))},
        "odd_norm_2d": {"w": jnp.zeros((4, 4))},
        "llama_proj": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros(6)},
    }
    m = optimizer.decay_mask(params)
    assert m["video_qformer"]["layer_0"]["query"] == {"kernel": True, "bias": False}
    assert m["video_qformer"]["layer_0"]["LayerNorm_0"] == {"scale": False, "bias": False}
    assert m["video_query_tokens"] is True          # ndim 3 -> decayed, as in torch
    assert m["frame_position_embedding"]["embedding"] is True
    assert m["ln_vision"]["scale"] is False
    assert m["odd_norm_2d"]["w"] is False          # a "norm" module is never decayed
    assert m["llama_proj"] == {"kernel": True, "bias": False}


def test_adamw_matches_torch_param_groups():
    """Our AdamW + per-step schedule vs torch.optim.AdamW with LAVIS's two param groups."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 3)).astype(np.float32)
    b0 = rng.normal(size=(3,)).astype(np.float32)
    grads = [(rng.normal(size=w0.shape).astype(np.float32), rng.normal(size=b0.shape).astype(np.float32))
             for _ in range(8)]
    sched = schedules.per_step_warmup_cosine(**{**KW, "init_lr": 1e-2, "min_lr": 1e-3, "warmup_lr": 1e-4})
    lrs = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(len(grads))))

    tw, tb = torch.nn.Parameter(torch.tensor(w0)), torch.nn.Parameter(torch.tensor(b0))
    opt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.05},
                             {"params": [tb], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    params = {"dense": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}}
    tx = optimizer.adamw(sched, params, weight_decay=0.05)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i, (gw, gb) in enumerate(grads):
        for group in opt.param_groups:   # LAVIS: scheduler.step() sets the lr before the update
            group["lr"] = float(lrs[i])
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
        g = {"dense": {"kernel": jnp.asarray(gw), "bias": jnp.asarray(gb)}}
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    err_w = assert_close(params["dense"]["kernel"], tw.detach().numpy(), atol=1e-6, what="kernel")
    err_b = assert_close(params["dense"]["bias"], tb.detach().numpy(), atol=1e-6, what="bias")
    print(f"\nAdamW vs torch after 8 steps: max abs err kernel {err_w:.2e}, bias {err_b:.2e}")
    # and the parameters really moved (the test would notice a no-op optimizer)
    assert np.abs(np.asarray(params["dense"]["kernel"]) - w0).max() > 1e-3


def test_grad_clip_clips_by_global_norm():
    params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
    grads = {"a": jnp.full((2, 2), 3.0), "b": jnp.full((3,), 4.0)}
    norm = math.sqrt(4 * 9 + 3 * 16)
    tx = optimizer.adamw(1e-3, params, grad_clip_norm=1.0)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    mu = state[1][0].mu  # chain(clip, adamw): adamw's first state is ScaleByAdamState
    assert_close(mu["a"], np.full((2, 2), 0.1 * 3.0 / norm), atol=1e-7, what="clipped first moment")
    no_clip = optimizer.adamw(1e-3, params, grad_clip_norm=0.0)
    _, state = jax.jit(no_clip.update)(grads, no_clip.init(params), params)
    assert_close(state[0].mu["a"], np.full((2, 2), 0.3), atol=1e-7, what="unclipped first moment")


def _reference_lrs(kind, init_lr, min_lr, warmup_lr, warmup_steps, iters_per_epoch, max_epoch):
    """The reference schedulers transcribed as plain Python, driven the way base_task drives
    them: `step(cur_epoch, cur_step)` before every iteration of every epoch."""
    def warm(step):
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * step / max(warmup_steps, 1))

    def cos(x, total):
        return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * x / total)) + min_lr

    out = []
    for epoch in range(max_epoch):
        for i in range(iters_per_epoch):
            if kind == "lavis":
                out.append(warm(i) if epoch == 0 else cos(epoch, max_epoch))
            else:
                total = epoch * iters_per_epoch + i
                out.append(warm(i) if total < warmup_steps else cos(total, max_epoch * iters_per_epoch))
    return np.asarray(out)


@pytest.mark.parametrize("kind,fn", [("lavis", schedules.lavis_warmup_cosine),
                                     ("video_llama", schedules.per_step_warmup_cosine)])
def test_schedules_match_reference_over_a_whole_stage1_run(kind, fn):
    kw = dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=2500, iters_per_epoch=2500,
              max_epoch=5)   # visionbranch_stage1_pretrain.yaml
    expected = _reference_lrs(kind, **kw)
    got = np.asarray(jax.jit(jax.vmap(fn(**kw)))(jnp.arange(len(expected))))
    np.testing.assert_allclose(got, expected, rtol=2e-6)
