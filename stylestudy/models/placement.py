"""Where a generating pipeline's components live (params generate.memory), so that a model larger than the GPU's
memory when whole still generates: the study's SD3 on a 16 GB card.

- none: every component on the device (SD2 fits whole in fp16: 2.6 GB).
- sequential: the text encoders alone on the device encode every prompt of the run; they are then dropped from the
  pipeline, and only the denoiser and the VAE go to the device. SD3 in fp16: 11.1 GB (T5-XXL 9.5, CLIP-L and bigG 1.6)
  while encoding, 4.3 GB (transformer 4.2, VAE 0.17) with activations while denoising, never both at once.
- cpu_offload: diffusers' enable_model_cpu_offload (each component moves to the GPU when it runs, back after).
On a CPU all three compute the same on the same device; the embeddings `sequential` computes first are the ones the
pipeline computes itself, so the images are the same whatever the mode.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from stylestudy.models.families import Family

log = logging.getLogger(__name__)
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def place(pipe: DiffusionPipeline, memory: str, device: torch.device) -> None:
    """Move the pipeline's components where `memory` wants them before generating."""
    if device.type == "cpu":
        return  # the components are there already
    if memory == "cpu_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif memory == "sequential":
        for name in TEXT_COMPONENTS:
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
    else:
        pipe.to(device)


def execution_device(pipe: DiffusionPipeline) -> torch.device:
    """Where the pipeline computes (with model offload, the GPU although the weights wait on the CPU)."""
    return pipe._execution_device


def encode_all_then_free(pipe: DiffusionPipeline, family: Family, texts: list[list[str]], guidance: bool,
                         device: torch.device) -> list[dict[str, Any]]:
    """The prompt embeddings of every batch of texts (kept on the CPU meanwhile), encoded on `device`; then the text
    encoders dropped from the pipeline and the denoiser and VAE moved to `device`."""
    import torch

    prompts = [{name: tensor.cpu() for name, tensor in family.encode_prompts(pipe, batch, guidance, device).items()}
               for batch in texts]
    pipe.register_modules(**{name: None for name in TEXT_COMPONENTS if hasattr(pipe, name)})
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pipe.to(device)
    log.info("sequential: %d prompt batches encoded, text encoders freed; denoising on %s", len(texts), device)
    return [{name: tensor.to(device) for name, tensor in batch.items()} for batch in prompts]
