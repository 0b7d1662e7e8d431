"""The memory options (stylestudy/train/lowmem.py) against the plain path, on the CPU: the fused backward's step
(exact with torch's AdamW and bitsandbytes' 8-bit one while no clipping applies; with clipping, each parameter
clipped on its own), stochastic rounding's expectation, the EMA on the CPU (exact), the optimizer states of bf16
weights through a checkpoint (exact), the refusals; then the stage's own loop on the tiny SD2 with each option
against the same run without it.

Broken once to see them fail: rounding to nearest instead of stochastically (`x.to(torch.bfloat16)`) fails the
expectation test; `keep_state_dtypes` not applied fails the checkpoint test (the moments come back in bf16); the EMA
updated with `lerp_` instead of the EMAModel's subtraction fails its exact comparison; the global norm taken after
clipping fails the grad-norm comparison."""
from __future__ import annotations

import copy

import pytest
import torch

from stylestudy.core.checks import check_memory_settings
from stylestudy.core.config import UserError
from stylestudy.train import lowmem

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = (64, 128, 32)
STEPS = 3


def linear_stack(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.GELU(),
                               torch.nn.Linear(SIZES[1], SIZES[2])).to(dtype)


def optimizer_for(name: str, params: list) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.01, min_8bit_size=1024)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def batch(step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(8, SIZES[0], generator=torch.Generator().manual_seed(step)).to(dtype)


def plain_steps(name: str, max_norm: float, per_parameter: bool = False) -> tuple[torch.nn.Module, list[float]]:
    """The loop's plain path: backward, clip over all parameters (or each on its own), step, zero."""
    model = linear_stack()
    params = list(model.parameters())
    optimizer, norms = optimizer_for(name, params), []
    for step in range(STEPS):
        model(batch(step)).pow(2).mean().backward()
        if per_parameter:
            norms.append(float(torch.stack([torch.nn.utils.clip_grad_norm_([p], max_norm) for p in params]).norm()))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, norms


def fused_steps(name: str, max_norm: float, dtype: torch.dtype = torch.float32) \
        -> tuple[torch.nn.Module, list[float], torch.optim.Optimizer]:
    model = linear_stack(dtype)
    params = list(model.parameters())
    optimizer = optimizer_for(name, params)
    fused, norms = lowmem.FusedBackward(params, optimizer, max_norm), []
    for step in range(STEPS):
        model(batch(step, dtype)).float().pow(2).mean().backward()
        assert all(p.grad is None for p in params), "every gradient freed in the backward pass"
        norms.append(fused.take_grad_norm())
    return model, norms, optimizer


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_fused_backward_steps_as_the_plain_path_without_clipping(name):
    """max_grad_norm above every norm: the same updates bit for bit, the same global norm to float rounding."""
    plain, plain_norms = plain_steps(name, 1e6)
    fused, fused_norms, _ = fused_steps(name, 1e6)
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    assert fused_norms == pytest.approx(plain_norms, rel=1e-6)


def test_fused_backward_clips_each_parameter_on_its_own_and_logs_the_global_norm():
    plain, plain_norms = plain_steps("adamw", 0.05, per_parameter=True)
    fused, fused_norms, _ = fused_steps("adamw", 0.05)
    for a, b in zip(plain.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    assert fused_norms == pytest.approx(plain_norms, rel=1e-6)
    assert min(fused_norms) > 0.05 * 2, "the clipping applied"
    globally, _ = plain_steps("adamw", 0.05)
    assert not all(torch.equal(a, b) for a, b in zip(globally.parameters(), fused.parameters()))


def test_stochastic_rounding_is_unbiased():
    """E[round(x)] = x: each value between its two bf16 neighbours lands on one of them, the upper one with
    probability (x - down) / (up - down); 20,000 draws put the mean within 4 standard errors of x."""
    torch.manual_seed(0)
    down = torch.tensor([1.0, -3.0, 0.15625, 1e-20, -2.5e5]).to(torch.bfloat16)
    up = (down.view(torch.int16) + 1).view(torch.bfloat16)  # the next bf16 away from zero (sign and magnitude)
    fraction = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.77])
    x = down.float() + fraction * (up.float() - down.float())
    draws = torch.stack([lowmem.stochastic_round(x) for _ in range(20_000)]).float()
    assert ((draws == down.float()) | (draws == up.float())).all()
    share_up = (draws == up.float()).float().mean(0)
    error = (fraction * (1 - fraction) / 20_000).sqrt()
    assert ((share_up - fraction).abs() < 4 * error).all(), (share_up, fraction)
    exact = torch.tensor([1.0, -0.5, 0.0, 3.0]).to(torch.bfloat16).float()
    assert torch.equal(lowmem.stochastic_round(exact).float(), exact)


def test_bf16_weights_follow_the_fp32_run_within_rounding():
    """bf16 weights stepped through fp32 copies and rounded stochastically end where fp32 weights do, within a few
    bf16 steps: mean |w_bf16 - w_fp32| below a fifth of the mean update, after 3 steps at lr 1e-2."""
    torch.manual_seed(1)
    reference, _ = plain_steps("adamw8bit", 1e6)
    rounded, _, optimizer = fused_steps("adamw8bit", 1e6, torch.bfloat16)
    start = linear_stack()
    for r, b, s in zip(reference.parameters(), rounded.parameters(), start.parameters()):
        assert b.dtype == torch.bfloat16
        assert (b.float() - r).abs().mean() < 0.2 * (r - s).abs().mean()
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert not any(t.dtype == torch.bfloat16 for t in states), "the optimizer's states stay fp32 (or 8-bit)"


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_bf16_weights_resume_with_their_fp32_states(name):
    """A checkpoint of the optimizer (its state dict, saved and loaded as accelerate does) brings the fp32 states of
    bf16 weights back as they were: without keep_state_dtypes torch's loader casts them to bf16 (bitsandbytes' keeps
    its own states)."""
    model, _, optimizer = fused_steps(name, 1e6, torch.bfloat16)
    saved = copy.deepcopy(optimizer.state_dict())
    fresh = optimizer_for(name, list(model.parameters()))
    lowmem.keep_state_dtypes(fresh)
    fresh.load_state_dict(saved)
    assert all(p.dtype == torch.bfloat16 and p.numel() > 0 for p in model.parameters())
    for param in model.parameters():
        for key, value in optimizer.state[param].items():
            if torch.is_tensor(value):
                got = fresh.state[param][key]
                assert got.dtype == value.dtype and torch.equal(got, value), key


def test_ema_on_the_cpu_equals_diffusers_ema():
    """ParameterEma (one parameter at a time, its own device) gives EMAModel's copy bit for bit, through its state
    dict, and copies it into the model."""
    from diffusers.training_utils import EMAModel

    model = linear_stack()
    params = list(model.parameters())
    reference, ours = EMAModel(params, decay=0.9, foreach=True), lowmem.ParameterEma(params, 0.9, "cpu")
    optimizer = optimizer_for("adamw", params)
    for step in range(STEPS + 3):
        model(batch(step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        reference.step(params)
        ours.step(params)
    assert all(torch.equal(a, b) for a, b in zip(reference.shadow_params, ours.shadow_params))
    restored = lowmem.ParameterEma(params, 0.9, "cpu")
    restored.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert restored.schedule.optimization_step == STEPS + 3
    target = linear_stack()
    restored.copy_to(target.parameters())
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), reference.shadow_params))


BASE = {"method": "full", "mixed_precision": "bf16", "gradient_accumulation_steps": 1, "lora_half_base": False,
        "fused_backward": False, "weights_dtype": "fp32", "launch": {"num_processes": 1}}


@pytest.mark.parametrize("options, words", [
    ({"lora_half_base": True}, "lora_half_base holds a LoRA run's frozen base"),
    ({"method": "lora", "lora_half_base": True, "mixed_precision": "no"}, "needs method lora and mixed_precision"),
    ({"fused_backward": True, "gradient_accumulation_steps": 4}, "set gradient_accumulation_steps 1"),
    ({"fused_backward": True, "mixed_precision": "fp16"}, "set mixed_precision bf16"),
    ({"fused_backward": True, "launch": {"num_processes": 2}}, "set launch.num_processes 1"),
    ({"weights_dtype": "bf16"}, "needs method full, fused_backward true and mixed_precision bf16"),
    ({"weights_dtype": "bf16", "fused_backward": True, "method": "lora"}, "needs method full"),
])
def test_settings_the_options_cannot_run_with_are_refused_in_one_line(options, words):
    with pytest.raises(UserError) as refused:
        check_memory_settings(BASE | options)
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert str(refused.value).startswith("params.yaml: finetune.")


def test_the_options_that_fit_together_pass():
    check_memory_settings(BASE)
    check_memory_settings(BASE | {"fused_backward": True, "weights_dtype": "bf16"})
    check_memory_settings(BASE | {"method": "lora", "lora_half_base": True, "mixed_precision": "fp16"})


def test_an_fp16_only_gpu_is_refused_bf16_weights(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(UserError, match="Tesla T4 has fp16 only"):
        lowmem.check_bf16_device(torch.device("cuda"))
    lowmem.check_bf16_device(torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:Expected a tensor")  # MemTracker meets the gradients the hooks freed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_never_holds_every_gradient(dtype):
    """Tracked by MemTracker (stylestudy/train/memory.py) as the bench tracks it: the plain step holds every gradient
    at its peak, the fused one at most the largest parameter's (in fp32 for bf16 weights, the copy it steps)."""
    from stylestudy.train import memory

    def peak(fused: bool) -> memory.MemoryPeak:
        model = linear_stack(dtype)
        params = list(model.parameters())
        optimizer = optimizer_for("adamw", params)
        hooks = lowmem.FusedBackward(params, optimizer, 1e6) if fused else None

        def step(after_backward):
            model(batch(0, dtype)).float().pow(2).mean().backward()
            after_backward()
            if hooks is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                hooks.take_squared_norm()

        return memory.track_steps(model, optimizer, step)

    sizes = [p.numel() for p in linear_stack().parameters()]
    plain, fused = peak(False), peak(True)
    assert plain.categories["gradients"] == sum(sizes) * dtype.itemsize
    assert fused.categories["gradients"] <= max(sizes) * 4
    if dtype == torch.float32:  # (plain bf16 steps keep bf16 moments, the fused path fp32 ones: not comparable)
        assert fused.total < plain.total
