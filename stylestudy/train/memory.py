"""Peak memory of training steps, measured by tensor accounting rather than counted by hand.

`track_steps` runs a step function under PyTorch's own tracker (`torch.distributed._tools.mem_tracker.MemTracker`, a
dispatch mode that follows every tensor storage as it is created and freed) and returns the peak of live tensor bytes
with its split by category at that moment. It counts what the tensors hold, not what an allocator reserves: on a GPU
`torch.cuda.max_memory_allocated` adds the caching allocator's rounding (512-byte blocks) and the kernels' workspaces
(cuBLAS, cuDNN), and the CUDA context (about 0.5 GiB) is outside both.

Under `fake_tensors()` the same step runs on tensors that have shapes and dtypes but no data, so full-size models
cost seconds and no memory here; a fake run and a real one track the same bytes (tests/test_memory.py).
bench/memory_measured.py runs the study's fine-tunes through it (bench/FINETUNE.md "Measured memory").
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# MemTracker's categories, as this project names them. Tensors handed in as `others` (here: the EMA's shadow copy)
# are tracked as "Other": nothing else is, since every tensor made during the steps gets a category of its own.
CATEGORIES = {"Parameter": "parameters", "Buffer": "buffers", "Gradient": "gradients", "Optstate": "optimizer_states",
              "Other": "ema", "Activation": "activations", "Temp": "temporaries"}


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


@dataclass(frozen=True)
class MemoryPeak:
    """The peak of live tensor bytes over the tracked steps, and its split by category at that moment (bytes).

    Activations are what the forward pass made (and, after the backward pass, what the optimizer and EMA steps made
    outside `optimizer.step`); temporaries what the backward pass made beyond the gradients, recomputed checkpointed
    activations included (MemTracker may put some of those under activations: the total is exact either way).
    Optimizer states at the peak include what `optimizer.step` holds while it runs (its temporaries: MemTracker
    counts all it makes as optimizer state); `between_steps` is what stays after the last step, by category."""

    total: int
    categories: dict[str, int]
    between_steps: dict[str, int]

    def gib(self) -> dict[str, float]:
        """The total and each category in GiB (2^30 bytes), rounded to 3 decimals."""
        return {name: round(value / 2**30, 3) for name, value in {"total": self.total, **self.categories}.items()}


def track_steps(model: Any, optimizer: Any, step: Callable[[Callable[[], None]], None], steps: int = 2,
                others: Sequence[Any] = ()) -> MemoryPeak:
    """Run `step(after_backward)` `steps` times under MemTracker and return the peak. The step calls
    `after_backward()` after each backward pass (each micro-batch's): MemTracker follows one forward and backward
    pass of module stats at a time and refuses a second forward pass otherwise; the peak is kept across them.
    `model`, `optimizer` and `others` (tensors made before, such as the EMA's copy) are what exists before the first
    step; the second step is the one that starts with the optimizer states there, as every later step does."""
    tracker = _global_peak_tracker()
    # MemTracker hooks every parameter's gradient and fails on frozen ones (LoRA's base): a placeholder where it
    # looks for a hook already there makes it skip them (torch 2.14)
    for param in model.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NO_HOOK, _NO_HOOK)
    tracker.track_external(model, optimizer, *others)
    with tracker:
        for _ in range(steps):
            step(tracker.reset_mod_stats)
        after = by_category(tracker.get_tracker_snapshot("current"))
    peak = by_category(tracker.get_tracker_snapshot("peak"))
    return MemoryPeak(peak.pop("total"), peak, {name: value for name, value in after.items() if name != "total"})


def _global_peak_tracker() -> Any:
    """A MemTracker that keeps the global peak only: its own updates every active module's peak at every operation,
    which takes hours on a full-size model's thousands of modules (torch 2.14); the global peak is kept the same way."""
    from copy import deepcopy

    from torch.distributed._tools.mem_tracker import MemTracker

    class GlobalPeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = deepcopy(snapshot)

    return GlobalPeakTracker()


def by_category(snapshot: dict[Any, dict[Any, int]]) -> dict[str, int]:
    """One device's MemTracker snapshot by this project's category names, with its "total"."""
    import torch

    # meta tensors hold no memory: the bench's stand-in for what lives off the device measured (an EMA on the CPU)
    snapshot = {device: counts for device, counts in snapshot.items() if torch.device(device).type != "meta"}
    if len(snapshot) != 1:
        raise ValueError(f"expected the tensors of one device, got {sorted(map(str, snapshot))}")
    counts = next(iter(snapshot.values()))
    named = {CATEGORIES[str(key.value)]: int(value) for key, value in counts.items() if key != "Total"}
    return named | {"total": int(counts["Total"])}


@contextlib.contextmanager
def fake_tensors() -> Iterator[Any]:
    """Tensors made inside have shapes, dtypes and devices but no data (FakeTensorMode): a full-size model's step
    runs in seconds here and MemTracker still sees every storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        yield mode


def fake_parameters(model: Any, device: Any, mode: Any = None) -> None:
    """Give `model`, built on the meta device, fake parameters and buffers on `device`, in place (call it inside
    `fake_tensors()`, whose mode is `mode`). Models are built on the meta device and made fake afterwards because
    peft's adapter injection moves modules with `.to()`, which cannot swap fake parameters (torch 2.14: "has weakref
    associated with it"). bitsandbytes' 4-bit weights, still unquantised on the meta device, are quantised here."""
    import torch

    made: dict[int, Any] = {}  # shared (tied) tensors stay shared
    replaced = []  # alive until the end: a freed tensor's id may be given to a new one
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                replaced.append(param)
                if id(param) not in made:
                    made[id(param)] = _fake_4bit(param, device, mode) if _unquantized_4bit(param) else \
                        torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                           requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]
                for i, constant in enumerate(_quant_constants(getattr(made[id(param)], "quant_state", None))):
                    # the tracker sees a module's parameters and buffers, not what hangs on a weight
                    module.register_buffer(f"{name}_quant_state_{i}", constant, persistent=False)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                replaced.append(buffer)
                made.setdefault(id(buffer), torch.empty(buffer.shape, dtype=buffer.dtype, device=device))
                module._buffers[name] = made[id(buffer)]


def _quant_constants(state: Any) -> list[Any]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset; the nested state's absmax and code)."""
    if state is None:
        return []
    tensors = [state.absmax, state.code, state.offset]
    return [t for t in tensors if t is not None] + _quant_constants(getattr(state, "state2", None))


def _unquantized_4bit(param: Any) -> bool:
    if type(param).__name__ == "Int8Params":
        raise NotImplementedError("bitsandbytes' 8-bit weights (LLM.int8) are not measured on fake tensors")
    return type(param).__name__ == "Params4bit" and not param.bnb_quantized


def _fake_4bit(param: Any, device: Any, mode: Any) -> Any:
    """A fake 4-bit weight as bitsandbytes quantises `param` on its way to a device (packed values and QuantState,
    made by its own quantize_4bit on fake tensors): a plain Parameter carrying the QuantState, which Linear4bit
    reads from its weight (bitsandbytes' Params4bit cannot wrap a fake tensor)."""
    import torch
    from bitsandbytes import functional
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    if mode is None:
        raise ValueError("a 4-bit weight is made fake inside fake_tensors() only: pass its mode")
    if "dynamic" not in functional.name2qmap:  # quantize_blockwise's map, made from real numbers (.tolist())
        with unset_fake_temporarily():
            functional.name2qmap["dynamic"] = functional.create_dynamic_map()
    dynamic = functional.name2qmap["dynamic"]
    functional.name2qmap["dynamic"] = mode.from_tensor(dynamic)
    try:
        packed, state = functional.quantize_4bit(
            torch.empty(param.shape, dtype=param.dtype, device=device), blocksize=param.blocksize,
            compress_statistics=param.compress_statistics, quant_type=param.quant_type,
            quant_storage=param.quant_storage)
    finally:
        functional.name2qmap["dynamic"] = dynamic
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    return weight


def make_optimizer(make: Callable[[], Any], mode: Any = None) -> Any:
    """`make()` the optimizer, inside `fake_tensors()` too: bitsandbytes' 8-bit optimizers build their quantisation
    maps from real numbers in their constructor (`.tolist()`), which fake tensors cannot give; built with fake tensors
    off, the maps are then made fake (`mode`, the FakeTensorMode) like every other tensor of the step."""
    if mode is None:
        return make()
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        optimizer = make()
    qmaps = getattr(optimizer, "name2qmap", None)
    if qmaps:
        optimizer.name2qmap = {name: mode.from_tensor(qmap) for name, qmap in qmaps.items()}
    return optimizer
