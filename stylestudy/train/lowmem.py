"""Memory options of the fine-tune (docs/pipeline.md "Fine-tuning options"; docs/sd3.md "SD3 full in 16 GB"), each off
in the study's defaults:

- `lora_half_base`: LoRA's frozen base weights in the mixed-precision dtype, the adapter in fp32 (`half_base`);
- `fused_backward`: the optimizer step taken inside the backward pass, one parameter at a time as soon as its gradient
  is whole, and that gradient freed at once (`FusedBackward`): the whole model's gradients never exist together;
- `weights_dtype: bf16`: the trained weights held in bf16; inside the fused step the optimizer updates an fp32 copy
  of one parameter, which is rounded stochastically back into the bf16 weight (`stochastic_round`);
- `ema_device: cpu`: the EMA's fp32 shadow copy on the CPU, updated parameter by parameter (`ParameterEma`).

stylestudy/train/build.py calls `make_trainable`, `make_ema` and `fuse`; stylestudy/train/loop.py reads
`FusedBackward.take_grad_norm` after each backward pass. bench/memory_measured.py runs the same objects on fake
tensors.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TYPE_CHECKING

from stylestudy.core.config import UserError
from stylestudy.train import lora

if TYPE_CHECKING:
    import torch

LOW_16_BITS = 1 << 16
HIGH_16_BITS = -LOW_16_BITS  # 0xFFFF0000 as an int32: keeps sign, exponent and bf16's 7 mantissa bits


def stochastic_round(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x` rounded to bf16 up or down at random, up with probability (x - down) / (up - down), so that the
    rounding is unbiased: E[result] = x. A bf16 value is the top 16 bits of an fp32 one; adding uniform random low 16
    bits to the int32 view and truncating them carries into bit 16 exactly that often. Signs need no case: the view
    is sign and magnitude, so the carry grows the magnitude of a negative value as of a positive one. It draws from
    the default generator of x's device, which checkpoints carry (a resumed run rounds as an uninterrupted one)."""
    import torch

    noise = torch.randint(0, LOW_16_BITS, x.shape, dtype=torch.int32, device=x.device)
    bits = (x.view(torch.int32) + noise).bitwise_and_(HIGH_16_BITS)
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def make_trainable(denoiser: Any, p: dict, targets: tuple[str, ...], device: Any) -> None:
    """Make the denoiser's weights what finetune trains, in place: a LoRA adapter on `targets` (fp32, on whatever
    base: a half-precision one with `lora_half_base`, FLUX's quantised one), or every weight (fp32, or bf16 with `weights_dtype`, checked against
    the accelerator `device`). build.load_trainee and bench/memory_measured.py both call it."""
    from stylestudy.models import loading

    if p["method"] == "lora":
        if p["lora_half_base"]:
            half_base(denoiser, loading.precision_that_runs(p["mixed_precision"]))
        lora.add_lora(denoiser, p["lora_rank"], p["lora_alpha"], targets)
        # peft gives the adapter its base layer's dtype: the half base's, or a 4-bit layer's compute dtype (FLUX's
        # NF4 base computes in bf16 on a GPU), where updates at lr 1e-5 would round away
        lora.keep_trainable_in_fp32(denoiser)
    elif p["weights_dtype"] == "bf16":
        bf16_weights(denoiser, device)


def half_base(denoiser: Any, precision: str) -> None:
    """Cast the whole denoiser to the mixed-precision dtype `precision` runs as (fp16 or bf16), before `add_lora`; the
    adapter is made fp32 after it (lora.keep_trainable_in_fp32). What diffusers' LoRA scripts do: autocast computes
    the matrix products in that dtype anyway, so the frozen weights lose little (the norms' scales are rounded too)
    and half their memory."""
    import torch

    # torch's Module.to: diffusers' own warns that some modules "should be kept in float32" even when it names none
    torch.nn.Module.to(denoiser, {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])


def check_bf16_device(device: Any) -> None:
    """bf16 weights need a device that computes in bf16: a CPU does; a CUDA GPU before Ampere (T4, V100) does not."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UserError(f"params.yaml: finetune.weights_dtype bf16 needs a GPU with bf16 ({name} has fp16 only): set "
                        "finetune.weights_dtype fp32 (docs/sd3.md \"SD3 full in 16 GB\")")


def bf16_weights(denoiser: Any, device: Any) -> None:
    """Hold the denoiser's weights in bf16 (`weights_dtype: bf16`), after checking that the device computes in it."""
    import torch

    check_bf16_device(device)
    torch.nn.Module.to(denoiser, torch.bfloat16)  # see half_base


class FusedBackward:
    """The optimizer step inside the backward pass (`fused_backward`), the PyTorch tutorial's "fusing the optimizer
    step into the backward pass" with one optimizer for all parameters: torch's AdamW and bitsandbytes' step only the
    parameters whose .grad is set, so stepping it in each parameter's post-accumulate-grad hook, then freeing that
    gradient, updates that parameter alone, while the optimizer's state dict and the LR schedule stay one object each
    (checkpoints as before). Only one gradient lives at a time, beside the activations' backward.

    Clipping cannot wait for the global norm (every gradient would have to live at once): each parameter's gradient
    is clipped to max_grad_norm on its own, by clip_grad_norm_'s rule. The squared norms before clipping are summed
    on the device as the hooks run: `take_grad_norm` gives the global pre-clip norm that the plain path logs."""

    def __init__(self, parameters: Sequence[Any], optimizer: Any, max_grad_norm: float) -> None:
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self.squared: Any = None
        self.handles = [param.register_post_accumulate_grad_hook(self.step_one) for param in parameters]

    def step_one(self, param: Any) -> None:
        """Clip this parameter's gradient, step the optimizer on it and free the gradient."""
        import torch

        if param.dtype == torch.float32:
            self.clip(param)
            self.optimizer.step()
        else:
            self.step_through_fp32(param)
        param.grad = None

    def clip(self, param: Any) -> None:
        import torch

        norm = torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm).float()
        self.squared = norm.square() if self.squared is None else self.squared + norm.square()

    def step_through_fp32(self, param: Any) -> None:
        """Step a half-precision weight through an fp32 copy of it and its gradient (the optimizer's states are then
        fp32 too), and round the result stochastically back: a bf16 weight rounded to nearest would lose every
        update smaller than half its last bit, which at lr 1e-5 is most of them."""
        import torch

        weight = param.data  # rounded back into the same storage: the module and the memory tracker keep theirs
        param.data, param.grad = weight.float(), param.grad.float()
        self.clip(param)
        self.optimizer.step()
        weight.copy_(stochastic_round(param.data))
        param.data = weight

    def take_grad_norm(self) -> float:
        """The global gradient norm before clipping, summed by the hooks of the last backward pass; resets the sum (a
        CPU-GPU sync point, once a step, as the plain path's clip_grad_norm_ read)."""
        squared = self.take_squared_norm()
        return float("nan") if squared is None else float(squared.sqrt())

    def take_squared_norm(self) -> Any:
        """The sum of squared norms as a tensor on the device (None before any hook ran), and reset it."""
        squared, self.squared = self.squared, None
        return squared


def fuse(trainable: Sequence[Any], optimizer: Any, p: dict, accelerator: Any) -> FusedBackward:
    """Hook the fused step onto the trainable parameters of a prepared run. The optimizer stepped is the one inside
    accelerate's wrapper: no loss scaler to consult (fp16 is refused with it, checks.check_memory_settings)."""
    if accelerator.distributed_type.value != "NO":
        raise UserError("params.yaml: finetune.fused_backward steps each parameter before the processes could average "
                        f"its gradient ({accelerator.distributed_type.value}): set it to false, or train in one "
                        "process")
    keep_state_dtypes(optimizer.optimizer)
    return FusedBackward(trainable, optimizer.optimizer, p["max_grad_norm"])


def keep_state_dtypes(optimizer: Any) -> None:
    """Make `optimizer.load_state_dict` keep the saved floating-point states as they were saved. torch's loader casts
    them to their parameter's dtype: with bf16 weights stepped through fp32 copies the fp32 moments would come back
    in bf16, and a resumed run would end elsewhere (bitsandbytes 0.50 casts only states outside its own names). While
    the states load, each parameter shows an empty fp32 tensor of its device (the loaders read dtype and device)."""
    import torch

    load = optimizer.load_state_dict

    def load_as_saved(state_dict: dict, *args: Any, **kwargs: Any) -> None:
        params = [param for group in optimizer.param_groups for param in group["params"]]
        held = [param.data for param in params]
        for param in params:
            if param.is_floating_point():
                param.data = torch.empty(0, dtype=torch.float32, device=param.device)
        try:
            load(state_dict, *args, **kwargs)
        finally:
            for param, data in zip(params, held):
                param.data = data

    optimizer.load_state_dict = load_as_saved


class ParameterEma:
    """An exponential moving average of the trainable parameters in fp32 on a device of its own (`ema_device: cpu`,
    or the accelerator's with bf16 weights, whose average must not be rounded to bf16), updated one parameter at a
    time: diffusers' EMAModel needs its copy on the parameters' device and in their dtype. Same decay schedule
    (EMAModel.get_decay, which this delegates to), same update (s -= (1 - decay) (s - p)), same state dict, so
    accelerate's checkpoints carry it as they carry EMAModel."""

    def __init__(self, parameters: Iterable[Any], decay: float, device: Any) -> None:
        import torch
        from diffusers.training_utils import EMAModel

        self.schedule = EMAModel([], decay=decay)  # its decay schedule and counters; the copy is ours
        self.device = torch.device(device)
        self.shadow_params = [param.detach().to(self.device, torch.float32, copy=True) for param in parameters]

    def step(self, parameters: Iterable[Any]) -> None:
        import torch

        self.schedule.optimization_step += 1
        one_minus_decay = 1 - self.schedule.get_decay(self.schedule.optimization_step)
        with torch.no_grad():
            for shadow, param in zip(self.shadow_params, parameters):
                shadow.sub_(shadow - param.detach().to(self.device, torch.float32), alpha=one_minus_decay)

    def copy_to(self, parameters: Iterable[Any]) -> None:
        for shadow, param in zip(self.shadow_params, parameters):
            param.data.copy_(shadow.to(param.device))

    def to(self, *args: Any, **kwargs: Any) -> None:
        """Stays where it was made (checkpoints.resume moves an EMA to the accelerator)."""

    def state_dict(self) -> dict:
        return self.schedule.state_dict() | {"shadow_params": self.shadow_params}

    def load_state_dict(self, state_dict: dict) -> None:
        import torch

        self.schedule.load_state_dict(state_dict)
        self.shadow_params = [t.to(self.device, torch.float32) for t in self.schedule.shadow_params]
        self.schedule.shadow_params = []


def make_ema(trainable: Sequence[Any], p: dict, device: Any, host: Any = "cpu") -> Any:
    """The EMA of the trainable parameters (None with use_ema off): diffusers' EMAModel, the study's, or a
    `ParameterEma` on `host` (`ema_device: cpu`; the bench's fake runs pass "meta", memory off the device measured)
    or, with bf16 weights, in fp32 on the accelerator `device`."""
    if not p["use_ema"]:
        return None
    if p["ema_device"] == "cpu":
        return ParameterEma(trainable, p["ema_decay"], host)
    if p["weights_dtype"] != "fp32":
        return ParameterEma(trainable, p["ema_decay"], device)
    from diffusers.training_utils import EMAModel

    return EMAModel(trainable, decay=p["ema_decay"], foreach=True)
