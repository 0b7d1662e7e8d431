"""finetune: fine-tune the denoiser (SD2: the UNet; SD3: the transformer) on the training split (the study's recipe,
and the options past it).

Reads SD_DIR (pipeline folder from fetch), GUIDE_DIR (the guidance CLIP, used by `clip_loss` only), RAW_DIR
(imagefolder), SPLIT_DIR/{train,val}.jsonl, LATENTS_DIR (the encode stage's latents and text embeddings, memory-mapped
with `encode.cache_latents`; refused in one line when made with other settings) and params `finetune`, `encode` (how
images and captions are encoded), `model` (the family, stylestudy/models/families/: SD_DIR must be one of its
pipelines), `shared` and `generate.style_prompt` (the CLIP loss's pre-prompt). Everything random in training draws
from `finetune.seed` (shared.seed unless set), not from the split's or generation's seed, so runs that differ only in
it are training replicates (docs/sweeps.md). Writes OUT_DIR, a diffusers pipeline folder whose denoiser is the
fine-tuned (EMA) one, with training_info.json, a model card README.md and, with `method: lora`, the
adapter alone (lora/pytorch_lora_weights.safetensors; the pipeline's UNet has it fused): the same inputs give the same
folder, byte for byte. LIVE_DIR: dvclive (loss, loss_mse, loss_clip, lr, grad norm per step; val_loss and validation
images every `validate_every` steps) and LIVE_DIR/timing.json (images/s, peak memory, seconds: they differ every
run, so they stay out of the model folder and the metrics).

Options past the study, each off in its defaults: `method: lora` (stylestudy/train/lora.py), `snr_gamma`,
`noise_offset` (the family's noise process), `caption_dropout` (stylestudy/train/batches.py), `clip_loss`
(stylestudy/train/losses.py), validation (stylestudy/train/validation.py); memory: `lora_half_base`,
`fused_backward`, `weights_dtype`, `ema_device` (stylestudy/train/lowmem.py). The loop: stylestudy/train/loop.py.

Interruption: every `checkpoint_every` optimizer steps the whole training state goes to SCRATCH_DIR (not a DVC output;
see stylestudy/train/checkpoints.py). A rerun resumes from the newest whole checkpoint and logs the step; it refuses,
with one line, a checkpoint made with other settings. SCRATCH_DIR is removed once OUT_DIR is written. A resumed run
ends with the same UNet weights, bit for bit on a CPU, as one never interrupted: the data order depends only on seed and epoch,
each item's random flip/crop/caption dropout only on seed, epoch and index, and the RNG states are restored.

Processes: the stage first checks params, the accelerate config named by `finetune.launch.config_file`, the process
count against this machine's GPUs, the inputs, the memory with `memory_budget_gb` (stylestudy/train/memory_plan.py)
and a checkpoint (one line each, exit 2; stylestudy/train/launch.py).
One plain process then trains right there; more (or DeepSpeed, FSDP) run as
`accelerate launch ... -m stages.finetune ARGS`, which this process becomes. Each process trains on its own shard of every epoch with its own noise (seed + process
index); the effective batch is train_batch_size x processes x gradient_accumulation_steps, steps count optimizer
steps, and the main process alone writes OUT_DIR, LIVE_DIR and the log (docs/scaling-out.md).

Speed: `encode.cache_latents` (stylestudy/data/latents.py), `optimizer: adamw_fused`, `channels_last`, `compile_unet`;
measured by bench/finetune_speed.py (bench/FINETUNE.md).

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
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

from stylestudy.core.config import UserError, cli, load_params, load_shared, parse_args, require_path
from stylestudy.core.outputs import MANIFEST, atomic_dir, fetch_origin, library_versions, write_json
from stylestudy.data import dataset, latents
from stylestudy.models import families, loading
from stylestudy.models.families import Family
from stylestudy.train import batches, build, checkpoints, launch, lora, loop, losses, memory_plan, modelcard
from stylestudy.train.validation import ValidationSet

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

ADAPTER_DIR = "lora"  # OUT_DIR/lora/pytorch_lora_weights.safetensors, for users who load it on the base model
# differ from run to run
TIMING = ("images_per_s", "peak_memory_mb", "train_seconds", "resumed_from_step", "skipped_steps")


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


@dataclass(frozen=True)
class Inputs:
    """What the loop trains on beside the denoiser: the data, validation, the CLIP loss's guide, truncated captions."""

    data: batches.TrainingData
    validation: ValidationSet | None
    guide: losses.Guide | None
    n_truncated: int


def save_pipeline(folders: Folders, family: Family, denoiser: Any, info: dict, p: dict) -> None:
    """The pretrained pipeline folder with the fine-tuned denoiser in place of the original one, a model card and, for
    LoRA, the adapter alone."""
    with atomic_dir(folders.out) as tmp:
        ignore = shutil.ignore_patterns(family.denoiser_folder, MANIFEST)
        shutil.copytree(folders.sd, tmp, dirs_exist_ok=True, ignore=ignore)
        if p["method"] == "lora":  # in its own folder: load_lora_weights on this pipeline would apply it twice
            lora.save_adapter(denoiser, tmp / ADAPTER_DIR, family)
            denoiser = family.fused(denoiser, folders.sd, lora.fused_copy)
        denoiser.save_pretrained(tmp / family.denoiser_folder, safe_serialization=True)
        write_json(tmp / "training_info.json", info)
        modelcard.write_model_card(tmp, info, lora=p["method"] == "lora")


def check_inputs(folders: Folders, p: dict, settings: latents.EncodeSettings, family: Family) \
        -> tuple[list[dict], list[dict]]:
    """The training and val rows, after cheap checks of every input folder."""
    families.check_pipeline_folder(folders.sd, family)
    if p["clip_loss"]["weight"] > 0:
        loading.check_clip_folder(folders.guide)
    if not launch.started_by_launcher():  # measured once, before `accelerate launch` starts the processes
        memory_plan.check_budget(family, folders.sd, p, settings, folders.guide, launch.device_type())
    require_path(folders.raw, "run the fetch stage first")
    rows = dataset.read_jsonl(require_path(folders.split / "train.jsonl", "run the split stage first"))
    if not rows:
        raise UserError(f"{folders.split}/train.jsonl is empty; raise split.fractions.train or add data")
    if folders.latents is not None and latents.cacheable(settings):  # another resolution: one line, not per process
        latents.check_encoded(folders.latents, rows, settings, folders.sd, family)
    val = folders.split / "val.jsonl"
    return rows, dataset.read_jsonl(val) if p["validate_every"] and val.is_file() else []


def run_fingerprint(folders: Folders, rows: list[dict], p: dict, settings: latents.EncodeSettings, family: Family,
                    seed: int, style_prompt: str, processes: int, device_type: str, precision: str) -> dict:
    """What a checkpoint must match to be resumed by this run (checkpoints.fingerprint)."""
    read = [folders.sd, folders.raw] + ([folders.guide] if p["clip_loss"]["weight"] else [])
    inputs = checkpoints.inputs_digest(read, rows)
    encoding = {f"encode.{k}": v for k, v in asdict(settings).items() if k not in checkpoints.RESUME_SAFE}
    return checkpoints.fingerprint(p, seed, inputs, processes, device_type, precision) | encoding | family.recorded() \
        | {"generate.style_prompt": style_prompt}


def preflight(folders: Folders, p: dict, settings: latents.EncodeSettings, family: Family, seed: int,
              style_prompt: str) -> None:
    """What run() checks before the slow part, checked before `accelerate launch` starts processes that would each
    print a refusal amid torchrun's report: the inputs and a checkpoint made by another run, one line each."""
    rows, _ = check_inputs(folders, p, settings, family)
    checkpoints.find_resumable(folders.scratch, run_fingerprint(
        folders, rows, p, settings, family, seed, style_prompt, p["launch"]["num_processes"], launch.device_type(),
        loading.precision_that_runs(p["mixed_precision"])))


def prepare_inputs(folders: Folders, family: Family, rows: list[dict], val_rows: list[dict], trainee: losses.Trainee,
                   p: dict, settings: latents.EncodeSettings, seed: int, style_prompt: str,
                   accelerator: Accelerator) -> Inputs:
    """Load the frozen encoders, encode with them what validation needs, and build the training data. The encoders
    are freed when this returns, but for what keeps them: encoding every step (no cache), the CLIP loss's VAE,
    validation's VAE."""
    device = accelerator.device
    encoders = family.load_encoders(folders.sd, device, settings.encoders_dtype(device))
    guide = None
    if p["clip_loss"]["weight"] > 0:
        kind = p["clip_loss"]["kind"]  # directional: the base model's x0 too, before any step changes the trainee
        reference = losses.reference_denoiser(trainee, p["method"], device) if kind == "directional" else None
        guide = losses.load_guide(folders.guide, device, encoders.vae, family, style_prompt, kind, reference)
    truncated = latents.count_truncated(encoders, [row["text"] for row in rows])
    validation = None
    if p["validate_every"] and accelerator.is_main_process:
        validation = ValidationSet.build(folders.raw, val_rows, encoders, trainee.noise, p, settings.resolution, seed)
    data = batches.training_data(folders.raw, rows, encoders, settings, p["caption_dropout"], folders.latents,
                                 folders.sd, show_progress=accelerator.is_local_main_process)
    return Inputs(data, validation, guide, truncated)


def run_info(result: dict, rows: list[dict], inputs: Inputs, p: dict, settings: latents.EncodeSettings,
             family: Family, seed: int, style_prompt: str, folders: Folders, accelerator: Accelerator) -> dict:
    """training_info.json: what made the model folder."""
    return {"steps": result["steps"], "final_loss": result["final_loss"], "params": p, "encode": asdict(settings),
            "seed": seed, "style_prompt": style_prompt, "n_train_images": len(rows),
            "n_captions_truncated": inputs.n_truncated, "device": str(accelerator.device),
            "mixed_precision_ran": accelerator.mixed_precision, "libraries": library_versions(),
            "base_model": fetch_origin(folders.sd), "dataset": fetch_origin(folders.raw),
            "num_processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.value,
            "effective_batch_size": launch.effective_batch(p, accelerator), "model": family.recorded()}


def run(folders: Folders, p: dict, settings: latents.EncodeSettings, seed: int, style_prompt: str,
        family: Family = families.FAMILIES["sd2"]) -> dict:
    """Fine-tune the pipeline of `family` (resuming from a checkpoint in `scratch` if there is one) and save; return
    the training summary."""
    from accelerate.utils import set_seed
    from dvclive import Live

    rows, val_rows = check_inputs(folders, p, settings, family)
    accelerator = build.build_accelerator(p, seed)
    launch.check_launched(accelerator, p)
    run_id = run_fingerprint(folders, rows, p, settings, family, seed, style_prompt, accelerator.num_processes,
                             accelerator.device.type, accelerator.mixed_precision)
    found = checkpoints.find_resumable(folders.scratch, run_id)  # before the slow part: a refusal comes at once
    set_seed(seed, device_specific=True)  # seed + process index: each process draws its own noise and timesteps
    trainee = build.load_trainee(family, folders.sd, p, accelerator.device)
    inputs = prepare_inputs(folders, family, rows, val_rows, trainee, p, settings, seed, style_prompt,
                            accelerator)
    build.release_memory(accelerator.device)
    dataloader = build.make_dataloader(inputs.data, p["train_batch_size"], p["dataloader_num_workers"], seed)
    state = build.prepare_training(trainee, dataloader, p, accelerator)
    position = checkpoints.resume(state.dataloader, state.ema, found, folders.live, accelerator)
    log.info("finetune (%s) on %d images, %d process(es) on %s, mixed precision %s; effective batch %d "
             "(train_batch_size x processes x gradient_accumulation_steps), %d optimizer steps per epoch, %d in all",
             p["method"], len(rows), accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision,
             launch.effective_batch(p, accelerator), state.steps_per_epoch, state.max_steps)
    save = functools.partial(checkpoints.save, accelerator, folders.scratch, run=run_id, live_dir=folders.live)
    # dvclive on the main process only (None on the others): a Live on each would clear, write and read back the
    # same files at once
    logging_to = Live(str(folders.live), dvcyaml=False, save_dvc_exp=False, resume=found is not None) \
        if accelerator.is_main_process else contextlib.nullcontext()
    with logging_to as live:
        extras = loop.Extras(inputs.data.to_inputs, inputs.guide, inputs.validation, live)
        result = loop.train(state, extras, position, p, accelerator, save)
    summary = result | {"resumed_from_step": position.step or None}
    denoiser = loop.final_denoiser(state, accelerator)
    if accelerator.is_main_process:
        info = run_info(result, rows, inputs, p, settings, family, seed, style_prompt, folders, accelerator)
        save_pipeline(folders, family, denoiser, info, p)
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
    settings = latents.EncodeSettings(**load_params("encode"))
    family = families.from_params(load_params("model"))
    loading.require_gpu(shared["profile"])
    checking = vars(args).pop("preflight")
    folders = Folders(**vars(args))
    if not launch.started_by_launcher():
        config = launch.check(p)
        # one plain process trains right here, and run() checks the inputs and a checkpoint itself
        if checking or launch.needs_launcher(config, p["launch"]["num_processes"]):
            preflight(folders, p, settings, family, p["seed"], style_prompt)
            if checking:
                return
            launch.relaunch(p, sys.argv[1:])
    run(folders, p, settings, p["seed"], style_prompt, family)


if __name__ == "__main__":
    main()
