"""The memory tracking that bench/memory_measured.py runs (stylestudy/train/memory.py), on a Linear stack whose
bytes are known: parameters, gradients and AdamW states (torch's and bitsandbytes' 8-bit ones), real and fake.

Broken once to see them fail: with `others` not handed to the tracker the EMA assertion fails (0 bytes); with the
8-bit absmax blocks counted per 512 values instead of 256 the 8-bit expectation is off by 4,096 bytes (both run)."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from stylestudy.train import memory

SIZES = (256, 512, 256)  # two Linear layers: 256 -> 512 -> 256


def linear_stack() -> torch.nn.Module:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Linear(SIZES[1], SIZES[2])
    return torch.nn.Sequential(first, torch.nn.ReLU(), second)


def run(optimizer_name: str, fake: bool, ema: bool = False) -> tuple[memory.MemoryPeak, torch.nn.Module]:
    with memory.fake_tensors() if fake else contextlib.nullcontext() as mode:
        model = linear_stack()
        params = list(model.parameters())
        if optimizer_name == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = memory.make_optimizer(lambda: bnb.optim.AdamW8bit(params, lr=1e-3), mode)
        else:
            optimizer = memory.make_optimizer(lambda: torch.optim.AdamW(params, lr=1e-3, foreach=False), mode)
        shadow = [p.detach().clone() for p in params] if ema else []

        def step(after_backward):
            model(torch.randn(8, SIZES[0])).pow(2).mean().backward()
            after_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for s, p in zip(shadow, params):
                s.lerp_(p.detach(), 0.1)

        return memory.track_steps(model, optimizer, step, others=shadow), model


def weight_numels(model: torch.nn.Module) -> list[int]:
    return [p.numel() for p in model.parameters()]


def test_adamw_bytes_are_exact():
    """fp32 parameters and gradients are 4 bytes a value; AdamW's two moments 8, plus a 4-byte step count per
    tensor; the EMA's copy 4 bytes a value, tracked as "ema". The peak falls in the second optimizer step, with every
    gradient there and the step's own temporaries (two of the last layer's size at once) counted as its states."""
    peak, model = run("adamw", fake=False, ema=True)
    n, sizes = sum(weight_numels(model)), weight_numels(model)
    states = 8 * n + 4 * len(sizes)
    assert peak.between_steps == {"parameters": 4 * n, "buffers": 0, "gradients": 0, "activations": 0,
                                  "temporaries": 0, "optimizer_states": states, "ema": 4 * n}
    assert peak.categories["parameters"] == 4 * n
    assert peak.categories["gradients"] == 4 * n
    assert peak.categories["optimizer_states"] == states + 2 * 4 * (sizes[2] + sizes[3])
    assert peak.categories["ema"] == 4 * n
    assert peak.total == sum(peak.categories.values())


def test_adamw8bit_states_are_counted_as_optimizer_states():
    """bitsandbytes' AdamW8bit: tensors of 4,096 values or more get two uint8 states and two fp32 absmax per block of
    256 values; smaller ones (the biases) fp32 states; plus the two 256-value quantisation maps (fp32), shared."""
    peak, model = run("adamw8bit", fake=False)
    expected = 2 * 256 * 4
    for numel in weight_numels(model):
        expected += 2 * numel + 2 * 4 * math.ceil(numel / 256) if numel >= 4096 else 2 * 4 * numel
    assert peak.between_steps["optimizer_states"] == expected
    assert peak.categories["optimizer_states"] >= expected
    assert peak.categories["parameters"] == 4 * sum(weight_numels(model))


@pytest.mark.parametrize("optimizer_name", ["adamw", "adamw8bit"])
def test_fake_tensors_track_the_same_bytes_as_real_ones(optimizer_name):
    real, _ = run(optimizer_name, fake=False, ema=True)
    fake, _ = run(optimizer_name, fake=True, ema=True)
    assert fake == real


def test_frozen_parameters_are_tracked_without_gradients():
    """A frozen first layer (LoRA's base): its weights count as parameters, no gradient, no optimizer state."""
    model = linear_stack()
    model[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, foreach=False)

    def step(after_backward):
        model(torch.randn(8, SIZES[0])).pow(2).mean().backward()
        after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = memory.track_steps(model, optimizer, step)
    n_trainable = sum(p.numel() for p in trainable)
    assert peak.categories["parameters"] == 4 * sum(weight_numels(model))
    assert peak.categories["gradients"] == 4 * n_trainable
    assert peak.between_steps["optimizer_states"] == 8 * n_trainable + 4 * len(trainable)
