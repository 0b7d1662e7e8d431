"""What GPUs offer, for the benches: dense (no 2:4 sparsity) half-precision tensor-core peaks by device name, for
MFU in bench/finetune_speed.py.

bf16 where the card has it (the study's mixed precision there), fp16 on the T4 and V100, which lack bf16. Figures are
the vendors' data-sheet numbers for the card's boost clock; a sustained matrix product reaches less (an 8192^3 bf16
product ran at about 790 TFLOP/s on this workplace's H100 and H200 against 989 here), which is part of what MFU says.
More specific names first: the first entry whose key is in the device's name wins. And what a 16 GB card offers,
for the 16 GB benches' emulation of one on a larger card (limited_device).
"""
from __future__ import annotations

PEAKS: tuple[tuple[str, float, str], ...] = (
    ("H100 NVL", 835e12, "H100 NVL dense bf16"),
    ("H100 PCIe", 756e12, "H100 PCIe dense bf16"),
    ("H100", 989e12, "H100 SXM dense bf16"),
    ("H200 NVL", 835e12, "H200 NVL dense bf16"),
    ("H200", 989e12, "H200 SXM dense bf16"),
    ("A100", 312e12, "A100 dense bf16"),
    ("L40S", 362e12, "L40S dense bf16"),
    ("L40", 181e12, "L40 dense bf16"),
    ("L4", 121e12, "L4 dense bf16"),
    ("A10G", 70e12, "A10G dense bf16"),
    ("T4", 65e12, "T4 dense fp16 (no bf16)"),
    ("V100", 125e12, "V100 SXM2 dense fp16 (no bf16)"),
)


def peak_flops(device_name: str) -> tuple[float, str] | None:
    """(FLOP/s, what it is) for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None for a device not listed."""
    return next(((flops, label) for key, flops, label in PEAKS if key in device_name), None)


# A "16 GB" card (T4, V100 16 GB) reports about 14.7 GiB of total memory, and the CUDA context (about 0.5 GiB) comes
# out of it without being counted against torch.cuda.set_per_process_memory_fraction: what our allocations may take.
LIMIT_GIB = 14.7 - 0.5


def memory_fraction(total_bytes: int) -> float:
    """The fraction of a card of `total_bytes` that leaves our allocations LIMIT_GIB (all of a smaller card)."""
    return min(1.0, LIMIT_GIB * 2**30 / total_bytes)


def limited_device(dry_run: bool):
    """Where a 16 GB bench runs: the CUDA device with our allocations limited to LIMIT_GIB, or the CPU for a dry run;
    without CUDA and without a dry run, the process exits with one line."""
    import sys

    import torch

    cuda = torch.cuda.is_available() and not dry_run
    if not cuda and not dry_run:
        sys.exit("error: no CUDA device: run with --dry-run for the tiny shapes on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(total), device)
    return device


def device_figures(device, dry_run: bool) -> dict:
    """What a 16 GB bench's JSON says of where it ran: dry run or not, the device's name and the limit it ran under."""
    import torch

    cuda = device.type == "cuda"
    return {"dry_run": dry_run, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "memory_limit_gib": LIMIT_GIB if cuda else None}


def peak_gib(device) -> float | None:
    """The peak of CUDA memory allocated (GiB); None on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def out_of_memory(error: Exception, device) -> dict:
    """A measurement that ran out of the limited memory: the error's first line and the peak it reached."""
    return {"out_of_memory": str(error).splitlines()[0], "peak_memory_gib": peak_gib(device)}
