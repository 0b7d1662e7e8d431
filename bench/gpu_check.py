"""The one-call GPU check: every measurement a short GPU loan allows, each step time-boxed, one JSON per step and a
summary Markdown under OUT_DIR. bench/gpu_check.sh sets up the environment and calls this.

Steps, in order (each a subprocess with its own time box in seconds, so a slow one cannot eat the rest; BOXES):
  1 full_profile   the `full` profile through `dvc repro` in a fresh copy, shortened (study-shaped random models, 100
                   synthetic 256 px images, 20 optimizer steps, the study's 5 prompts x 2 images at 512 px, the study's
                   precision settings; DVC's cache hard-linked, not copied): each stage's seconds and the device's peak
                   memory during it, the record rewritten as each stage starts
  2 finetune_speed bench/finetune_speed.py at 256 px, batch 32, 3 steps, eager, on step 1's SD: straightforward
                   recipe, ours, LoRA, CLIP loss
  3 generate_speed bench/generate_speed.py at 512 px, 30 images (the naive loop timed on 6), on step 1's models:
                   naive, diffusers batched, ours; PSNR; evaluation time
  4 sd3            bench/sd3_memory.py OUT_JSON: SD3 Medium's shapes fine-tuned and sampled in what a 16 GB card offers
  5 sdxl           bench/lora_16gb.py sdxl OUT_JSON: SDXL's 2.6B UNet, a LoRA step at the study's settings in 16 GB
  6 flux           bench/lora_16gb.py flux OUT_JSON: FLUX.1's 12B transformer quantised to NF4, a QLoRA step, in 16 GB
  7 ddp            step 1's fine-tune again with conf/accelerate/ddp.yaml on 2 GPUs (a recorded skip with fewer)
  8 determinism    the same short fine-tune twice: identical UNet weights or not, and by how much they differ
  9 compiled       finetune_speed.py and generate_speed.py with --compile, warm-up apart, if time remains
The bench scripts rewrite their JSON after each part, so a step stopped by its box keeps what it finished; steps 7 and
8 need only step 1's stages up to `encode`. Disk, from the study-shaped models' sizes (SD 4.9 GB, CLIP 3.7, BLIP 0.9,
bench/RESULTS.md): about 17 GB in step 1's copy with the fine-tuned model (DVC's cache hard-linked, not a second
copy); up to 10 GB more while a step fine-tunes twice or builds its own models (removed after): under 30 GB at worst.

--dry-run: the same steps at tiny size on the CPU (tiny models in the full profile's shape, a few steps), the same
files, marked "dry_run": true; tests/test_gpu_check.py runs it so the script cannot rot before a GPU comes.
Run: bench/gpu_check.sh OUT_DIR [--dry-run]   (python bench/gpu_check.py OUT_DIR [--dry-run] in a set-up environment)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check_tools import MemorySampler, fresh_copy, read_json, run, stage_times, step_record  # noqa: E402

BUDGET_S = 450  # the steps on a GPU: 8 minutes less about 30 s for the set-up (installing gpu-wheels/, imports)
# Each step's box; on one GPU (no DDP) they add up to the budget, so the compiled step runs only on what others leave
# (the budget has room for it where a step ends early). FLUX's box holds building the 12B transformer on the CPU (bf16)
# and quantising it on its way to the GPU, then six steps; SDXL's, six steps of the 2.6B UNet
BOXES = {"full_profile": 150, "finetune_speed": 55, "generate_speed": 55, "sd3": 45, "sdxl": 35, "flux": 75, "ddp": 45,
         "determinism": 35, "compiled": BUDGET_S}
STEPS = tuple(BOXES)
# Shortened `full` profile: 100 images of 256 px, 20 optimizer steps, the study's 5 prompts x 2 images at 512 px
FULL = ["profile=full", "fetch.data.n_images=100", "finetune.max_train_steps=20", "finetune.checkpoint_every=0",
        "finetune.validate_every=10", "generate.images_per_prompt=2", "generate.test_captions=5",
        "clip_eval.kid_subsets=10"]
# What steps 7 and 8 read in step 1's copy: the stages that write it
FINETUNE_INPUTS = {"fetch@sd", "fetch@guide", "fetch@data", "split", "encode"}
# The dry run: the same shape with tiny models and sizes, on the CPU
TINY = FULL + [f"fetch.{k}.source=tiny" for k in ("sd", "clip", "blip", "guide", "csd")] + [
    "fetch.data.n_images=24", "fetch.data.image_size=64", "encode.resolution=32", "encode.dataloader_num_workers=0",
    "finetune.max_train_steps=2", "finetune.train_batch_size=4", "finetune.gradient_accumulation_steps=1",
    "finetune.validate_every=2", "finetune.validation_steps=2", "finetune.dataloader_num_workers=0",
    "finetune.launch.config_file=conf/accelerate/cpu.yaml", "generate.images_per_prompt=1",
    "generate.num_inference_steps=2", "generate.resolution=32", "generate.batch_size=5", "generate.test_captions=2",
    "clip_eval.bootstrap_samples=50", "clip_eval.permutation_samples=50", "blip_check.max_new_tokens=4"]
DETERMINISM_STEPS = 5
DRY_RUN_BOX_S = 600  # each step's limit in a dry run: none is meant to reach it, even on a CPU loaded five times over


@dataclass
class Check:
    out: Path
    dry_run: bool
    started: float = field(default_factory=time.perf_counter)
    clone: Path | None = None  # step 1's copy of the repository, reused by steps 2, 3, 7 and 8
    finished_stages: set[str] = field(default_factory=set)  # step 1's stages that ran to their end

    def left(self) -> float:
        return BUDGET_S - (time.perf_counter() - self.started)

    def write(self, number: int, name: str, record: dict, quiet: bool = False) -> dict:
        record = {"step": number, "name": name, "dry_run": self.dry_run} | record
        (self.out / f"{number:02d}_{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        if not quiet:
            print(f"step {number} {name}: {record['status']} ({record.get('seconds', 0):.0f} s)", flush=True)
        return record

    def models(self, *names: str) -> Path | None:
        """Step 1's models/pretrained, if it fetched every one of `names` (study-shaped random models, on a GPU)."""
        done = all(f"fetch@{name}" in self.finished_stages for name in names)
        return self.clone / "models/pretrained" if done and not self.dry_run else None


def full_profile(check: Check, timeout: float) -> dict:
    """Step 1: a fresh copy of the repository, params composed for the shortened profile, `dvc repro`."""
    import re

    from stylestudy.core.config import compose_params

    check.clone = fresh_copy(Path(tempfile.mkdtemp(prefix="gpu-check-")) / "clone")
    overrides = TINY if check.dry_run else FULL
    compose_params(check.clone / "params.yaml", check.clone, overrides)
    # outputs moved into the cache and hard-linked back: no second copy of ~16 GB on disk, nor the time to write it
    (check.clone / ".dvc/config.local").write_text("[cache]\n    type = hardlink\n")
    sampler, marks = MemorySampler(), {}
    command = [shutil.which("dvc") or str(Path(sys.executable).parent / "dvc"), "repro"]
    said = command + [f"(params: -S {' -S '.join(overrides)})"]

    def figures(completed: bool) -> dict:
        stages, check.finished_stages = stage_times(marks, time.perf_counter(), completed)
        for name, stage in stages.items():
            stage["peak_device_memory_mib"] = sampler.peaks.get(name)
        return {"overrides": overrides, "stages": stages}

    def on_line(line: str) -> None:
        if found := re.search(r"Running stage '([^']+)'", line):
            sampler.label = found.group(1)
            marks[sampler.label] = time.perf_counter()
            check.write(1, "full_profile", {"status": "running", "command": " ".join(said),
                                            "seconds": time.perf_counter() - started, "figures": figures(False)},
                        quiet=True)

    started = time.perf_counter()
    sampler.thread.start()
    code, seconds, tail = run(command, check.clone, timeout, {"HF_HUB_OFFLINE": "1", "SKETCH_ALLOW_CPU": "1"}, on_line)
    sampler.stop.set()
    result = figures(code == 0) | {"finetune_timing": read_json(check.clone / "reports/finetune/timing.json")}
    return step_record(said, code, seconds, tail, result)


def bench_script(check: Check, timeout: float, script: str, args: list[str], tiny: list[str], name: str) -> dict:
    """Steps 2, 3 and 7: a bench script with its --json figures."""
    out = check.out / f"{name}.raw.json"
    command = [sys.executable, str(REPO / "bench" / script), *(tiny if check.dry_run else args), "--json", str(out)]
    code, seconds, tail = run(command, REPO, timeout)
    return step_record(command, code, seconds, tail, read_json(out))


def memory_16gb(check: Check, timeout: float, script: str, args: list[str], name: str) -> dict:
    """Steps 4 to 6: a bench script that measures a family's shapes in what a 16 GB card offers (tiny on the CPU in
    a dry run), with its JSON figures."""
    out = check.out / f"{name}.raw.json"
    command = [sys.executable, str(REPO / "bench" / script), *args, str(out)]
    command += ["--dry-run"] if check.dry_run else []
    code, seconds, tail = run(command, REPO, timeout)
    return step_record(command, code, seconds, tail, read_json(out))


def finetune_again(check: Check, timeout: float, overrides: list[str], out: str) -> tuple[list[str], int | str, float,
                                                                                          str]:
    """Step 1's fine-tune once more in its copy with more overrides, written to `out` (not a DVC output)."""
    from stylestudy.core.config import compose_params

    compose_params(check.clone / "params.yaml", check.clone, (TINY if check.dry_run else FULL) + overrides)
    command = [sys.executable, "-m", "stages.finetune", "models/pretrained/sd", "models/pretrained/guide", "data/raw",
               "data/split", "data/latents", out, f"{out}-live", f"{out}-scratch"]
    code, seconds, tail = run(command, check.clone, timeout, {"HF_HUB_OFFLINE": "1", "SKETCH_ALLOW_CPU": "1"})
    return command + [f"(params: -S {' -S '.join(overrides)})"], code, seconds, tail


def ddp(check: Check, timeout: float) -> dict:
    import torch

    gpus = torch.cuda.device_count()
    if not check.dry_run and gpus < 2:
        return {"status": "skipped", "seconds": 0.0, "reason": f"this machine has {gpus} GPU: DDP needs 2"}
    config = "conf/accelerate/cpu.yaml" if check.dry_run else "conf/accelerate/ddp.yaml"
    result = finetune_again(check, timeout, [f"finetune.launch.config_file={config}",
                                             "finetune.launch.num_processes=2"], "ddp")
    record = step_record(*result, read_json(check.clone / "ddp-live/timing.json"))
    shutil.rmtree(check.clone / "ddp", ignore_errors=True)  # its UNet: a few GB of disk, not read
    return record


def determinism(check: Check, timeout: float) -> dict:
    """The same short fine-tune twice: are the UNet weights identical? (reported, not promised)"""
    from safetensors.torch import load_file

    steps = 2 if check.dry_run else DETERMINISM_STEPS
    overrides = [f"finetune.max_train_steps={steps}", "finetune.validate_every=0"]
    records = [finetune_again(check, timeout / 2, overrides, f"determinism-{k}") for k in (1, 2)]
    if any(code != 0 for _, code, _, _ in records):
        return step_record(*next(r for r in records if r[1] != 0))
    a, b = (load_file(str(check.clone / f"determinism-{k}/unet/diffusion_pytorch_model.safetensors")) for k in (1, 2))
    for k in (1, 2):
        shutil.rmtree(check.clone / f"determinism-{k}", ignore_errors=True)
    differing = [k for k in a if not a[k].equal(b[k])]
    largest = max(((a[k].float() - b[k].float()).abs().max().item() for k in differing), default=0.0)
    figures = {"identical": not differing, "tensors_differing": len(differing), "tensors": len(a),
               "max_abs_difference": largest, "steps": steps,
               "note": "GPU kernels (cuDNN autotuning, atomics in backward) need not be deterministic; "
                       "torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8 and "
                       "cudnn.benchmark off make them so, at a cost this step does not measure"}
    return step_record(records[0][0], 0, sum(r[2] for r in records), records[1][3], figures)


def compiled(check: Check, timeout: float) -> dict:
    if check.dry_run:
        return {"status": "skipped", "seconds": 0.0, "reason": "dry run: compiling takes minutes on a CPU"}
    if timeout < 120:
        return {"status": "skipped", "seconds": 0.0, "reason": f"only {timeout:.0f} s left of the {BUDGET_S} s budget"}
    sd, models = check.models("sd"), check.models("sd", "clip", "blip")
    records = [bench_script(check, timeout * 0.6, "finetune_speed.py",
                            ["--resolution", "256", "--batch-sizes", "32", "--steps", "5", "--compile"] + (
                                ["--sd", str(sd / "sd")] if sd else []), [], "compiled_finetune"),
               bench_script(check, timeout * 0.4, "generate_speed.py",
                            ["--arch", "full", "--images-per-prompt", "6", "--naive-images", "6", "--compile"] + (
                                ["--models", str(models)] if models else []), [], "compiled_generate")]
    status = "ok" if all(r["status"] == "ok" for r in records) else records[0]["status"]
    return {"status": status, "seconds": sum(r["seconds"] for r in records), "parts": records}


def run_steps(check: Check, env: dict) -> list[dict]:
    """Every step in order, each given its box or what is left of the budget, whichever is less; the summary
    rewritten after each, so a check stopped from outside still leaves one."""
    tiny_finetune = ["--arch", "tiny", "--resolution", "32", "--batch-sizes", "1", "--steps", "2", "--warmup", "1"]
    tiny_generate = ["--arch", "tiny", "--resolution", "32", "--prompts", "2", "--images-per-prompt", "1", "--steps",
                     "2", "--naive-steps", "2", "--no-compile"]
    sd, models = (lambda: ["--sd", str(m / "sd")] if (m := check.models("sd")) else []), (
        lambda: ["--models", str(m)] if (m := check.models("sd", "clip", "blip")) else [])
    plan = {
        "full_profile": lambda t: full_profile(check, t),
        "finetune_speed": lambda t: bench_script(
            check, t, "finetune_speed.py", ["--resolution", "256", "--batch-sizes", "32", "--steps", "3", "--warmup",
                                            "1", "--no-compile", *sd()], tiny_finetune, "finetune_speed"),
        "generate_speed": lambda t: bench_script(
            check, t, "generate_speed.py", ["--arch", "full", "--images-per-prompt", "6", "--naive-images", "6",
                                            "--no-compile", *models()], tiny_generate, "generate_speed"),
        "sd3": lambda t: memory_16gb(check, t, "sd3_memory.py", [], "sd3"),
        "sdxl": lambda t: memory_16gb(check, t, "lora_16gb.py", ["sdxl"], "sdxl"),
        "flux": lambda t: memory_16gb(check, t, "lora_16gb.py", ["flux"], "flux"),
        "ddp": lambda t: ddp(check, t),
        "determinism": lambda t: determinism(check, t),
        "compiled": lambda t: compiled(check, t),
    }
    records = []
    for number, (name, step) in enumerate(plan.items(), 1):
        box = DRY_RUN_BOX_S if check.dry_run else max(min(BOXES[name], check.left()), 1)
        if name in ("ddp", "determinism") and not FINETUNE_INPUTS <= check.finished_stages:
            record = {"status": "skipped", "seconds": 0.0,
                      "reason": f"step 1 did not finish {', '.join(sorted(FINETUNE_INPUTS - check.finished_stages))}"}
        else:
            record = step(box) | {"box_s": box}
        records.append(check.write(number, name, record))
        (check.out / "summary.md").write_text(summary(check, env, records))
    return records


def environment(setup: str) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip() if smi else None
    libraries = {name: metadata.version(name) for name in ("torch", "diffusers", "accelerate", "bitsandbytes",
                                                           "transformers", "open-clip-torch", "dvc")}
    # where the carried packages come from: gpu-wheels/'s temporary folder on a GPU machine, .venv in the dry run
    sources = {name: find_spec(name).origin for name in ("diffusers", "dvc", "bitsandbytes", "open_clip")}
    return {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            "gpus": torch.cuda.device_count(), "driver": driver, "cuda": torch.version.cuda,
            "python": f"{platform.python_version()} ({sys.executable})", "libraries": libraries,
            "sources": sources, "environment_setup": setup}


def summary(check: Check, env: dict, records: list[dict]) -> str:
    lines = [f"# GPU check{' (dry run on the CPU: tiny sizes, figures mean nothing)' if check.dry_run else ''}", "",
             f"- device: {env['device']} ({env['gpus']} GPU), driver {env['driver']}, CUDA {env['cuda']}",
             f"- python {env['python']}; " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()),
             f"- environment: {env['environment_setup']}",
             f"- total: {time.perf_counter() - check.started:.0f} s (budget {BUDGET_S} s on a GPU)", "",
             "| step | status | seconds | command or reason |", "|---|---|---|---|"]
    for r in records:
        said = r.get("reason") or r.get("command") or "; ".join(p["command"] for p in r.get("parts", []))
        lines.append(f"| {r['step']} {r['name']} | {r['status']} | {r['seconds']:.0f} | `{said}` |")
    lines += ["", "Figures: the step JSON files beside this one (`figures`), the bench scripts' own JSON (*.raw.json)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write the step JSON files and summary.md into")
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny size on the CPU")
    parser.add_argument("--setup", default="as found", help=argparse.SUPPRESS)  # what gpu_check.sh did
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here: bench/gpu_check.sh measures a GPU; --dry-run runs its steps on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.dry_run)
    env = environment(args.setup)
    (check.out / "00_environment.json").write_text(json.dumps(env | {"dry_run": args.dry_run}, indent=1) + "\n")
    run_steps(check, env)
    if check.clone is not None:
        shutil.rmtree(check.clone.parent, ignore_errors=True)
    print(f"wrote {check.out}/summary.md")


if __name__ == "__main__":
    main()
