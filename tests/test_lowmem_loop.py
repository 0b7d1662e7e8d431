"""Each memory option (stylestudy/train/lowmem.py) in the stage's own loop (build.prepare_training, loop.train_batch)
on the tiny SD2, against the same three steps without it: the fused backward and the EMA on the CPU exactly (no
clipping applies), bf16 weights and LoRA's half-precision base within the stated tolerances. The resumed runs are in
tests/test_resume.py.

Each can fail: the bf16 test runs the broken variant itself (rounding to nearest, which fails the slope bound it
must pass); an exact comparison fails on any change of the update, as a step taken twice or not at all. Slow: nine
short trainings (about 12 s of calls here, plus the tiny pipeline's setup)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import composed, fresh_accelerator_state
from stylestudy.data import dataset, latents, sketches
from stylestudy.models.families import sd2
from stylestudy.train import batches, build, checkpoints, lora, loop, lowmem

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
STEPS = 3
# No clipping (the fused path clips each parameter on its own), bf16 on both sides (one Accelerator state a process)
SETTINGS = {"train_batch_size": 4, "gradient_accumulation_steps": 1, "mixed_precision": "bf16",
            "max_grad_norm": 1e6, "dataloader_num_workers": 0, "use_ema": True, "ema_decay": 0.9}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sd_dir) -> tuple[Path, list[dict], dict, latents.EncodeSettings]:
    root = tmp_path_factory.mktemp("lowmem")
    sketches.make_synthetic_sketches(root / "raw", 12, 32, 0)
    params = composed("profile=smoke")
    return root / "raw", dataset.read_metadata(root / "raw"), params["finetune"] | SETTINGS, \
        latents.EncodeSettings(**params["encode"])


def run_steps(sd_dir: Path, inputs: tuple, options: dict) -> dict:
    """STEPS optimizer steps of finetune's loop with `options`: the trainable weights (fp32 copies), the EMA's copy,
    the losses and grad norms."""
    from accelerate.utils import set_seed

    # accelerate keeps one mixed precision a process: the suite's earlier tests may have set another (fp16)
    with fresh_accelerator_state():
        raw, rows, p, encoding = inputs
        p = p | options
        accelerator = build.build_accelerator(p, 0)
        set_seed(0)
        trainee = build.load_trainee(sd2.FAMILY, sd_dir, p, accelerator.device)
        encoders = sd2.FAMILY.load_encoders(sd_dir, accelerator.device, torch.float32)
        data = batches.training_data(raw, rows, encoders, encoding, 0.0)
        dataloader = build.make_dataloader(data, p["train_batch_size"], 0, 0)
        state = build.prepare_training(trainee, dataloader, p, accelerator)
        extras, result = loop.Extras(data.to_inputs, None, None, None), {"loss": [], "grad_norm": []}
        result["start"] = [t.detach().float().clone() for t in state.trainable]
        for step, batch in zip(range(STEPS), checkpoints.epoch_batches(state.dataloader, 0, 0, accelerator)):
            terms, grad_norm, applied = loop.train_batch(batch, state, extras, p, accelerator, step)
            assert applied
            state.ema.step(state.trainable)
            result["loss"].append(float(terms["loss"].detach()))
            result["grad_norm"].append(grad_norm)
        result["weights"] = [t.detach().float().clone() for t in lora.trainable_parameters(state.model)]
        result["dtypes"] = {t.dtype for t in state.model.parameters()}
        result["ema"] = [t.float().clone() for t in state.ema.shadow_params]
    return result


@pytest.fixture(scope="module")
def plain(sd_dir, inputs) -> dict:
    return run_steps(sd_dir, inputs, {})


def mean_abs(tensors: list) -> float:
    return float(torch.cat([t.flatten() for t in tensors]).abs().mean())


def test_fused_backward_and_the_cpu_ema_give_the_plain_runs_weights(sd_dir, inputs, plain):
    fused = run_steps(sd_dir, inputs, {"fused_backward": True, "ema_device": "cpu"})
    assert all(torch.equal(a, b) for a, b in zip(plain["weights"], fused["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(plain["ema"], fused["ema"]))
    assert fused["loss"] == plain["loss"]
    assert fused["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(plain["start"], fused["weights"])), "the weights moved"


def update_slope(reference: dict, other: dict) -> float:
    """The least-squares slope of `other`'s weight update on `reference`'s, over every trainable value: 1 for an
    unbiased update whatever its noise, 0 for one lost."""
    ref = torch.cat([(w - s).flatten() for w, s in zip(reference["weights"], reference["start"])])
    got = torch.cat([(w - s).flatten() for w, s in zip(other["weights"], other["start"])])
    return float((ref * got).sum() / (ref * ref).sum())


def test_bf16_weights_keep_the_updates_that_rounding_to_nearest_loses(sd_dir, inputs, monkeypatch):
    """At the study's learning rate (1e-5) an update is far below a bf16 weight's last bit. bf16 weights (fused,
    stochastic rounding, fp32 EMA on the accelerator) keep it on average: the slope of their update on the fp32
    run's, over 3 steps, between 0.5 and 1.5 (0.77 measured; the rest is the rounding's noise and the bf16 forward
    pass); rounded to nearest, under 0.2 (0.09 measured). The first loss is the fp32 run's exactly (autocast computes
    in bf16 either way)."""
    study_lr = {"learning_rate": 1e-5}
    reference = run_steps(sd_dir, inputs, study_lr)
    low = run_steps(sd_dir, inputs, study_lr | {"fused_backward": True, "weights_dtype": "bf16"})
    assert low["dtypes"] == {torch.bfloat16} and all(t.dtype == torch.float32 for t in low["ema"])
    assert low["loss"][0] == reference["loss"][0]
    assert 0.5 < update_slope(reference, low) < 1.5
    monkeypatch.setattr(lowmem, "stochastic_round", lambda x: x.to(torch.bfloat16))
    nearest = run_steps(sd_dir, inputs, study_lr | {"fused_backward": True, "weights_dtype": "bf16"})
    assert update_slope(reference, nearest) < 0.2


def test_lora_half_base_follows_the_fp32_base_within_rounding(sd_dir, inputs):
    """LoRA on a bf16 base against LoRA on the fp32 base, both under bf16 autocast: the losses within 1%, the
    adapter's mean distance under a fifth of its mean update; the adapter stays fp32."""
    fp32 = run_steps(sd_dir, inputs, {"method": "lora"})
    half = run_steps(sd_dir, inputs, {"method": "lora", "lora_half_base": True})
    assert fp32["dtypes"] == {torch.float32} and half["dtypes"] == {torch.float32, torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in half["weights"])
    assert half["loss"] == pytest.approx(fp32["loss"], rel=0.01)
    update = mean_abs([a - s for a, s in zip(fp32["weights"], fp32["start"])])
    assert update > 0
    assert mean_abs([a - b for a, b in zip(fp32["weights"], half["weights"])]) < 0.2 * update
