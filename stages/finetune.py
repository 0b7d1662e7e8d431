"""finetune: fine-tune the Stable Diffusion UNet on the training split (the study's recipe, and the options past it).

Reads SD_DIR (pipeline folder from fetch), GUIDE_DIR (the guidance CLIP, used by `clip_loss` only), RAW_DIR
(imagefolder), SPLIT_DIR/{train,val}.jsonl, LATENTS_DIR (the encode stage's latents and text embeddings, memory-mapped
with `cache_latents`; refused in one line when made with other settings) and params `finetune`, `shared` and
`generate.style_prompt` (the CLIP loss's pre-prompt). Writes OUT_DIR, a diffusers pipeline folder whose UNet is the
fine-tuned (EMA) one, with training_info.json, a model card README.md and, with `method: lora`, the adapter alone
(lora/pytorch_lora_weights.safetensors; the pipeline's UNet has it fused): the same inputs give the same folder, byte
for byte. LIVE_DIR: dvclive (loss, loss_mse, loss_clip, lr, grad norm per step; val_loss and validation images every
`validate_every` steps) and LIVE_DIR/timing.json (images/s, peak memory, seconds: they differ every run, so they stay
out of the model folder and the metrics).

Options past the study, each off in its defaults: `method: lora` (stylestudy/train/lora.py), `snr_gamma`, `noise_offset`,
`caption_dropout` and `clip_loss` (stylestudy/train/losses.py), validation (stylestudy/train/validation.py).

Interruption: every `checkpoint_every` optimizer steps the whole training state goes to SCRATCH_DIR (not a DVC output;
see stylestudy/train/checkpoints.py). A rerun resumes from the newest whole checkpoint and logs the step; it refuses, with one
line, a checkpoint made with other settings. SCRATCH_DIR is removed once OUT_DIR is written. A resumed run ends with
the same UNet weights, bit for bit on a CPU, as one never interrupted: the data order depends only on seed and epoch,
each item's random flip/crop/caption dropout only on seed, epoch and index, and the RNG states are restored.

Processes: the stage first checks params, the accelerate config named by `finetune.launch.config_file`, the process
count against this machine's GPUs, the inputs and a checkpoint (one line each, exit 2; stylestudy/train/launch.py). One plain
process then trains right there; more (or DeepSpeed, FSDP) run as `accelerate launch ... -m stages.finetune ARGS`,
which this process becomes. Each process trains on its own shard of every epoch with its own noise (seed + process
index); the effective batch is train_batch_size x processes x gradient_accumulation_steps, steps count optimizer
steps, and the main process alone writes OUT_DIR, LIVE_DIR and the log (README "Scaling out").

Speed: `cache_latents` (stylestudy/data/latents.py), `optimizer: adamw_fused`, `channels_last`, `compile_unet`; measured by
bench/finetune_speed.py (bench/FINETUNE.md).

Run: python -m stages.finetune SD_DIR GUIDE_DIR RAW_DIR SPLIT_DIR LATENTS_DIR OUT_DIR LIVE_DIR SCRATCH_DIR
(--preflight: check only; on several machines: accelerate launch ... -m stages.finetune ARGS by hand). params.yaml is
validated whole before any work.
Example: python -m stages.finetune models/pretrained/sd models/pretrained/guide data/raw data/split data/latents \
    models/finetuned reports/finetune scratch/finetune
"""
from __future__ import annotations

import contextlib
import functools
import logging
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from stylestudy.train import build, checkpoints, launch, lora, losses, modelcard
from stylestudy.data import dataset, latents
from stylestudy.models import loading
from stylestudy.train.validation import ValidationSet
from stylestudy.core.config import UserError, cli, load_params, load_shared, parse_args, require_path
from stylestudy.core.outputs import MANIFEST, atomic_dir, fetch_origin, library_versions, write_json

log = logging.getLogger(__name__)

ADAPTER_DIR = "lora"  # OUT_DIR/lora/pytorch_lora_weights.safetensors, for users who load it on the base model
TIMING = ("images_per_s", "peak_memory_mb", "train_seconds", "resumed_from_step")  # differ from run to run


@dataclass(frozen=True)
class Folders:
    """The stage's inputs and outputs, as dvc.yaml passes them."""

    sd: Path
    guide: Path
    raw: Path
    split: Path
    out: Path
    live: Path
    scratch: Path
    latents: Path | None = None  # the encode stage's folder; None: cache_latents encodes in memory (tests, benches)


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_batch(batch: dict, parts: dict, loop: dict, p: dict, accelerator, step: int) -> tuple[dict, float]:
    """Forward and backward on one batch towards optimizer step `step` (0-based), and the optimizer step at the end of
    an accumulation; the losses (loss, loss_mse, loss_clip) and the grad norm."""
    unet, optimizer = loop["unet"], loop["optimizer"]
    grad_norm = float("nan")
    with accelerator.accumulate(unet):
        terms = losses.training_loss(batch, parts, unet, p, step)
        accelerator.backward(terms["loss"])
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(loop["trainable"], p["max_grad_norm"])  # None: DeepSpeed clips, unread
            grad_norm = float("nan") if norm is None else float(norm)
        optimizer.step()
        loop["lr_scheduler"].step()
        optimizer.zero_grad(set_to_none=True)
    return terms, grad_norm


def after_step(step: int, terms: dict, grad_norm: float, loop: dict, p: dict, live, validation) -> float:
    """Log the step (and validate every validate_every steps) to dvclive, on the main process; return the loss."""
    values = {name: float(value.detach()) for name, value in terms.items()}
    if live is not None:
        if validation is not None and step % p["validate_every"] == 0:
            validation.log(live, loop["model"], step)
        log_step(live, values | {"lr": loop["lr_scheduler"].get_last_lr()[0], "grad_norm": grad_norm})
    return values["loss"]


def train(parts: dict, loop: dict, position: checkpoints.Position, p: dict, accelerator, live, save: Callable,
          validation: ValidationSet | None) -> dict:
    """The training loop from `position`, calling save(position) every checkpoint_every steps; returns the summary."""
    dataloader, ema, max_steps = loop["dataloader"], loop["ema"], loop["max_steps"]
    step, epoch, done, loss = position.step, position.epoch, position.batch, float("nan")
    bar = tqdm(total=max_steps, initial=step, desc="finetune", unit="step",
               disable=not accelerator.is_local_main_process)
    started, images = time.perf_counter(), 0
    seen: list[int] = []  # the items this process trained on in this epoch
    while step < max_steps:
        for batch in checkpoints.epoch_batches(dataloader, epoch, done, accelerator):
            done += 1
            seen += batch["index"]
            terms, grad_norm = train_batch(batch, parts, loop, p, accelerator, step)
            images += latents.batch_size(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if ema:
                ema.step(loop["trainable"])
            step += 1
            loss = after_step(step, terms, grad_norm, loop, p, live, validation)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if p["checkpoint_every"] and step % p["checkpoint_every"] == 0 and step < max_steps:
                save(checkpoints.Position(step, epoch, done))
            if step >= max_steps:
                break
        launch.log_epoch_items(accelerator, epoch, seen, len(dataloader.dataset))
        seen, epoch, done = [], epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - started
    return {"steps": step, "final_loss": loss, "train_seconds": seconds,
            "images_per_s": images / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(accelerator.device)}


def log_step(live, values: dict) -> None:
    for name, value in values.items():
        live.log_metric(name, value)
    live.next_step()


def final_unet(loop: dict, accelerator):
    """The trained UNet with the EMA weights in place: a plain UNet (LoRA fused in), ready for save_pretrained. Every
    process calls it: under FSDP they gather the shards, and the other processes get None."""
    import torch

    unet = accelerator.unwrap_model(loop["unet"])
    if accelerator.distributed_type == "FSDP":  # the whole UNet, on the main process (no EMA or LoRA there: launch.py)
        state = accelerator.get_state_dict(loop["unet"])
        if not accelerator.is_main_process:
            return None
        unet = type(unet).from_config(unet.config)
        unet.load_state_dict(state)
    unet = unet.to(memory_format=torch.contiguous_format)  # safetensors needs it
    if loop["ema"]:
        loop["ema"].copy_to(lora.trainable_parameters(unet))
    return unet


def save_pipeline(folders: Folders, unet, info: dict, p: dict) -> None:
    """The pretrained pipeline folder with the fine-tuned UNet in place of the original one, a model card and, for
    LoRA, the adapter alone."""
    with atomic_dir(folders.out) as tmp:
        shutil.copytree(folders.sd, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", MANIFEST))
        if p["method"] == "lora":  # in its own folder: load_lora_weights on this pipeline would apply it twice
            lora.save_adapter(unet, tmp / ADAPTER_DIR)
            unet = lora.fused_copy(unet)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        write_json(tmp / "training_info.json", info)
        modelcard.write_model_card(tmp, info, lora=p["method"] == "lora")


def check_inputs(folders: Folders, p: dict) -> tuple[list[dict], list[dict]]:
    """The training and val rows, after cheap checks of every input folder."""
    loading.check_sd_folder(folders.sd)
    if p["clip_loss"]["weight"] > 0:
        loading.check_clip_folder(folders.guide)
    require_path(folders.raw, "run the fetch stage first")
    rows = dataset.read_jsonl(require_path(folders.split / "train.jsonl", "run the split stage first"))
    if not rows:
        raise UserError(f"{folders.split}/train.jsonl is empty; raise split.fractions.train or add data")
    if folders.latents is not None and latents.cacheable(p):
        latents.check_encoded(folders.latents, rows, p, folders.sd)  # another resolution: one line, not per process
    val = folders.split / "val.jsonl"
    return rows, dataset.read_jsonl(val) if p["validate_every"] and val.is_file() else []


def run_fingerprint(folders: Folders, rows: list[dict], p: dict, seed: int, style_prompt: str, processes: int,
                    device_type: str, precision: str) -> dict:
    """What a checkpoint must match to be resumed by this run (checkpoints.fingerprint)."""
    inputs = checkpoints.inputs_digest([folders.sd, folders.raw] + ([folders.guide] if p["clip_loss"]["weight"] else []),
                                    rows)
    return checkpoints.fingerprint(p, seed, inputs, processes, device_type, precision) | {
        "generate.style_prompt": style_prompt}


def preflight(folders: Folders, p: dict, seed: int, style_prompt: str) -> None:
    """What run() checks before the slow part, checked before `accelerate launch` starts processes that would each
    print a refusal amid torchrun's report: the inputs and a checkpoint made by another run, one line each."""
    rows, _ = check_inputs(folders, p)
    checkpoints.find_resumable(folders.scratch, run_fingerprint(
        folders, rows, p, seed, style_prompt, p["launch"]["num_processes"], launch.device_type(),
        loading.precision_that_runs(p["mixed_precision"])))


def run(folders: Folders, p: dict, seed: int, style_prompt: str) -> dict:
    """Fine-tune (resuming from a checkpoint in `scratch` if there is one) and save; return the training summary."""
    from accelerate.utils import set_seed
    from dvclive import Live

    rows, val_rows = check_inputs(folders, p)
    accelerator = build.build_accelerator(p, seed)
    launch.check_launched(accelerator, p)
    run_id = run_fingerprint(folders, rows, p, seed, style_prompt, accelerator.num_processes,
                             accelerator.device.type, accelerator.mixed_precision)
    found = checkpoints.find_resumable(folders.scratch, run_id)  # before the slow part: a refusal comes at once
    set_seed(seed, device_specific=True)  # seed + process index: each process draws its own noise and timesteps
    parts = build.load_components(folders.sd, p, accelerator)
    build.add_guide(parts, folders.guide, style_prompt, p)
    truncated = latents.count_truncated(parts["tokenizer"], [row["text"] for row in rows])
    validating = p["validate_every"] and accelerator.is_main_process  # before the latent cache frees the VAE
    validation = ValidationSet.build(folders.raw, val_rows, parts, p, seed) if validating else None
    dataloader = build.make_dataloader(folders.raw, rows, parts, p, seed, folders.latents, folders.sd)
    loop = build.prepare_training(parts, dataloader, p, accelerator)
    position = checkpoints.resume(loop, found, folders.live, accelerator)
    log.info("finetune (%s) on %d images, %d process(es) on %s, mixed precision %s; effective batch %d "
             "(train_batch_size x processes x gradient_accumulation_steps), %d optimizer steps per epoch, %d in all",
             p["method"], len(rows), accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision,
             launch.effective_batch(p, accelerator), loop["steps_per_epoch"], loop["max_steps"])
    save = functools.partial(checkpoints.save, accelerator, folders.scratch, run=run_id, live_dir=folders.live)
    # dvclive on the main process only (None on the others): a Live on each would clear, write and read back the
    # same files at once
    logging_to = Live(str(folders.live), dvcyaml=False, save_dvc_exp=False, resume=found is not None) \
        if accelerator.is_main_process else contextlib.nullcontext()
    with logging_to as live:
        result = train(parts, loop, position, p, accelerator, live, save, validation)
    summary = result | {"resumed_from_step": position.step or None}
    unet = final_unet(loop, accelerator)
    if accelerator.is_main_process:
        info = {"steps": result["steps"], "final_loss": result["final_loss"], "params": p, "seed": seed,
                "style_prompt": style_prompt, "n_train_images": len(rows), "n_captions_truncated": truncated,
                "device": str(accelerator.device), "mixed_precision_ran": accelerator.mixed_precision,
                "libraries": library_versions(), "base_model": fetch_origin(folders.sd),
                "dataset": fetch_origin(folders.raw), "num_processes": accelerator.num_processes,
                "distributed_type": accelerator.distributed_type.value,
                "effective_batch_size": launch.effective_batch(p, accelerator)}
        save_pipeline(folders, unet, info, p)
        write_json(folders.live / "timing.json", {k: summary[k] for k in TIMING})
        log.info("wrote %s and %s", folders.out, folders.live)
    checkpoints.discard(accelerator, folders.scratch)
    return summary


@cli
def main() -> None:
    launch.die_with_launcher()
    args = parse_args(__doc__, {
        "sd": "the pretrained pipeline folder (models/pretrained/sd)",
        "guide": "the guidance CLIP folder, read with finetune.clip_loss.weight > 0 (models/pretrained/guide)",
        "raw": "the imagefolder (data/raw)", "split": "the split folder with train.jsonl and val.jsonl (data/split)",
        "latents": "the encode stage's latents and text embeddings, read with cache_latents (data/latents)",
        "out": "the fine-tuned pipeline folder to write (models/finetuned)",
        "live": "the dvclive folder to write (reports/finetune)",
        "scratch": "where resumable checkpoints go while training runs (scratch/finetune)",
        "--preflight": {"action": "store_true", "help": "only check params, the launch settings, the inputs and a "
                        "checkpoint, as the stage does before it trains or starts `accelerate launch`"},
    })
    p, shared, style_prompt = load_params("finetune"), load_shared(), load_params("generate")["style_prompt"]
    loading.require_gpu(shared["profile"])
    checking = vars(args).pop("preflight")
    folders = Folders(**vars(args))
    if not launch.started_by_launcher():
        config = launch.check(p)
        # one plain process trains right here, and run() checks the inputs and a checkpoint itself
        if checking or launch.needs_launcher(config, p["launch"]["num_processes"]):
            preflight(folders, p, shared["seed"], style_prompt)
            if checking:
                return
            launch.relaunch(p, sys.argv[1:])
    run(folders, p, shared["seed"], style_prompt)


if __name__ == "__main__":
    main()
