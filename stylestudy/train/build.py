"""What a fine-tune is built from: the accelerator, the model parts (every UNet weight or a LoRA adapter), the data
loader, and the optimizer, LR schedule and EMA over the trainable parameters. stages/finetune.py runs the loop."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from stylestudy.train import checkpoints, launch, lora, losses
from stylestudy.data import latents
from stylestudy.models import loading

log = logging.getLogger(__name__)


def build_accelerator(p: dict, seed: int):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    precision = loading.precision_that_runs(p["mixed_precision"])
    # The seedable sampler shuffles epoch e with seed + e, whatever came before: a resumed run sees the same order.
    data_loading = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    # cpu: without a CUDA GPU, processes that torchrun started (conf/accelerate/cpu.yaml) join one gloo group instead
    # of each training alone; a single process runs on the CPU either way.
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=p["gradient_accumulation_steps"],
                              dataloader_config=data_loading, cpu=not torch.cuda.is_available())
    launch.quiet_unless_main(accelerator)
    if precision != p["mixed_precision"]:
        log.info("mixed_precision %s runs as %s on this device", p["mixed_precision"], precision)
    return accelerator


def load_components(sd_dir: Path, p: dict, accelerator) -> dict:
    """Tokenizer, frozen text encoder and VAE (in the compute dtype on GPU), the UNet (every weight trainable, or a
    LoRA adapter on its attention projections with `method: lora`), the training noise scheduler."""
    import torch
    from diffusers import DDPMScheduler

    pipe = loading.load_sd_pipeline(sd_dir)
    frozen_dtype = loading.frozen_dtype(accelerator.mixed_precision, accelerator.device)
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.to(accelerator.device, dtype=frozen_dtype)
    if p["method"] == "lora":  # the UNet stays fp32 (autocast computes in half precision): the adapter is fp32 too
        lora.add_lora(pipe.unet, p["lora_rank"], p["lora_alpha"])
    if p["gradient_checkpointing"]:
        pipe.unet.enable_gradient_checkpointing()
    if p["channels_last"] and p["optimizer"] == "adamw8bit":
        # bitsandbytes makes the weights contiguous at its first step while its states stay NHWC: no gain, and a
        # resumed run then trains on other numbers.
        log.info("channels_last is ignored with optimizer adamw8bit")
    elif p["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
    if p["compile_unet"]:
        pipe.unet.compile()  # in place: the module, its state dict and checkpoints keep their names
    pipe.unet.train()
    noise_scheduler = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae, "unet": pipe.unet,
            "noise_scheduler": noise_scheduler, "frozen_dtype": frozen_dtype, "device": accelerator.device,
            "latent_scale": pipe.vae.config.scaling_factor, "main_process": accelerator.is_local_main_process}


def make_optimizer(parameters, p: dict):
    import torch

    kwargs = {"lr": p["learning_rate"], "betas": (p["adam_beta1"], p["adam_beta2"]),
              "weight_decay": p["adam_weight_decay"], "eps": p["adam_epsilon"]}
    if p["optimizer"] == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    if p["optimizer"] == "adamw_fused":
        # One kernel for all parameters on CUDA instead of a few per tensor; foreach is the CPU's closest.
        on_cuda = torch.cuda.is_available()
        return torch.optim.AdamW(parameters, fused=on_cuda, foreach=not on_cuda, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def make_dataloader(raw: Path, rows: list[dict], parts: dict, p: dict, seed: int, encoded_dir: Path | None = None,
                    sd_dir: Path | None = None):
    """Shuffled batches, of cached latents (from the encode stage's folder, if given) or of pixels and token ids; the
    order depends only on the seed and epoch."""
    import torch

    items, collate = latents.training_items(raw, rows, parts, p, encoded_dir, sd_dir)
    # Numbered: each batch carries its items' indices, so that the loop can tell which items each process trained on.
    dataset = checkpoints.SeededItems(launch.Numbered(items), seed)
    # With its own generator, making an iterator draws the workers' base seed from it, not from the global RNG.
    return torch.utils.data.DataLoader(
        dataset, batch_size=p["train_batch_size"], shuffle=True, collate_fn=launch.NumberedBatch(collate),
        num_workers=p["dataloader_num_workers"], generator=torch.Generator().manual_seed(seed),
    )


def add_guide(parts: dict, guide_dir: Path, style_prompt: str, p: dict) -> None:
    """The frozen guidance CLIP and the style pre-prompt for finetune.clip_loss (nothing is loaded while it is off)."""
    on = p["clip_loss"]["weight"] > 0
    parts["guide"] = losses.load_guide(guide_dir, parts["device"]) if on else None
    parts["style_prompt"] = style_prompt


def prepare_training(parts: dict, dataloader, p: dict, accelerator) -> dict:
    """Optimizer, LR schedule and EMA over the trainable parameters (all of the UNet, or the LoRA adapter), prepared
    by accelerate; the EMA is registered so that checkpoints carry it."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    unet = parts["unet"]
    # Each process sees its shard of the data: steps come from the prepared dataloader, not the whole dataset.
    dataloader = accelerator.prepare(dataloader)
    steps_per_epoch = math.ceil(len(dataloader) / p["gradient_accumulation_steps"])
    max_steps = p["max_train_steps"] or p["epochs"] * steps_per_epoch
    trainable = lora.trainable_parameters(unet)
    optimizer = make_optimizer(trainable, p)
    # accelerate steps a prepared scheduler once per process at every optimizer step.
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(p["lr_scheduler"], optimizer, num_warmup_steps=p["lr_warmup_steps"] * n,
                                 num_training_steps=max_steps * n)
    ema = EMAModel(trainable, decay=p["ema_decay"], foreach=True) if p["use_ema"] else None
    if accelerator.distributed_type == "DEEPSPEED":
        # DeepSpeed sizes its buffers by one process's batch: from a dataloader in this same prepare call, or from here
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = p["train_batch_size"]
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)
    # "model": the UNet itself, for validation on one process (a forward through the DDP wrapper would wait for the
    # other processes).
    return {"unet": unet, "model": accelerator.unwrap_model(unet), "trainable": trainable, "optimizer": optimizer,
            "dataloader": dataloader, "lr_scheduler": lr_scheduler, "ema": ema, "max_steps": max_steps,
            "steps_per_epoch": steps_per_epoch}
