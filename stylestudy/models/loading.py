"""Loading, checking and copying the scoring models' folders (open_clip, BLIP), the checks every model folder
shares, and where and in which dtype models run. Diffusion pipeline folders belong to their family
(stylestudy/models/families/).

Folders are canonical library formats, safetensors only: an open_clip `local-dir:` folder (`open_clip_config.json` +
`open_clip_model.safetensors`) and a transformers BLIP captioner folder (stylestudy/models/builders.py makes random
ones from configs). Heavy libraries are imported inside the functions so that importing this module stays fast.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from stylestudy.core.config import UserError

if TYPE_CHECKING:
    from transformers import BlipForConditionalGeneration, BlipProcessor

# bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward" while diffusers imports it; users read it as
# an error. Set before any import of it, hence at module level.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

CLIP_CONFIG = "open_clip_config.json"
CLIP_WEIGHTS = "open_clip_model.safetensors"
# open_clip prefers these names in this order; a plain model.safetensors beside them is usually the HF-format twin.
CLIP_WEIGHT_NAMES = (CLIP_WEIGHTS, "open_clip_pytorch_model.safetensors")
CLIP_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "merges.txt", "vocab.txt", "spiece.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_ONLY = "pickle weights only; this project loads safetensors only: fetch or convert the .safetensors files"
def quiet_libraries() -> None:
    """Keep transformers/diffusers warnings (init notes, deprecations) out of the user's terminal."""
    for name in ("transformers", "diffusers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def user_errors(path: Path, what: str) -> Iterator[None]:
    """Turn a library's error while loading `path` (a missing, truncated or foreign weights file, weights of other
    shapes) into one line naming the file once, why, and the remedy."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(load_failure(path, what, e)) from e


def unreadable_safetensors(path: Path) -> tuple[Path, str] | None:
    """The first .safetensors file below `path` whose header or size is not a whole safetensors file, and why."""
    from safetensors import safe_open

    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            return file, str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def load_failure(path: Path, what: str, error: BaseException) -> str:
    """The one line for a load of `path` that failed with `error`."""
    bad = unreadable_safetensors(path)
    if bad:
        file, why = bad
        return (f"{file}: not a whole safetensors file (truncated, or another format: {why}); re-download it, or "
                f"re-create {path}")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reason = " ".join(first.split(". ")[0].split()).rstrip(" .'")  # the first sentence, not the library's advice
    if "expected shape" in reason:
        return (f"{path}: cannot load it as {what}: weights of other shapes than its config.json names ({reason}); "
                "re-create or re-download the folder")
    return f"{path}: cannot load it as {what} ({reason}); re-create or re-download the folder"


def require_dir(path: Path, what: str) -> None:
    """Raise UserError unless `path` is an existing folder."""
    if not path.exists():
        raise UserError(f"{path}: does not exist; expected {what} folder (check the path, or fetch the model)")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; expected {what} folder (give the folder, not a single weights file)")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, or raise UserError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable JSON ({e}); re-create the folder") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; re-create the folder")
    return data


def require_safetensors(folder: Path, names: tuple[str, ...] = ()) -> None:
    """Raise UserError unless `folder` holds safetensors weights (any, or one of `names`), refusing pickle-only."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n in names if names else n.endswith((".safetensors", ".safetensors.index.json")) for n in files):
        return
    if any(n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json") for n in files):
        raise UserError(f"{folder}: {SAFETENSORS_ONLY}")
    expected = " or ".join(names) if names else "*.safetensors"
    raise UserError(f"{folder}: no weights ({expected}); re-create or re-download the folder")


def check_clip_folder(path: Path) -> None:
    """Cheaply check that `path` is an open_clip local-dir folder with safetensors weights."""
    require_dir(path, "an open_clip")
    config = path / CLIP_CONFIG
    if not config.is_file():
        raise UserError(f"{path}: no {CLIP_CONFIG}; expected an open_clip folder (config + {CLIP_WEIGHTS})")
    if "model_cfg" not in read_json(config):
        raise UserError(f"{config}: no 'model_cfg' key; expected an open_clip config file")
    require_safetensors(path, CLIP_WEIGHT_NAMES)


def check_blip_folder(path: Path) -> None:
    """Cheaply check that `path` is a transformers BLIP captioning folder with safetensors weights."""
    require_dir(path, "a BLIP captioning")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json; expected a transformers BLIP captioning folder")
    config = read_json(config_file)
    if config.get("model_type") != "blip":
        raise UserError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'blip'")
    architectures = config.get("architectures") or ["BlipForConditionalGeneration"]
    if "BlipForConditionalGeneration" not in architectures:
        raise UserError(f"{config_file}: architectures {architectures} is not a captioner (BlipForConditionalGeneration)")
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise UserError(f"{path}: no preprocessor_config.json; the folder lacks its BlipProcessor files")
    require_safetensors(path, ("model.safetensors", "model.safetensors.index.json"))


def write_open_clip(out_dir: Path, config: dict[str, Any], state_dict: dict[str, Any]) -> None:
    """Write an open_clip local-dir folder: the JSON config and the weights as safetensors."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out_dir / CLIP_WEIGHTS))


def default_dtype(device: Any) -> Any:
    """The inference dtype unless one is asked for: fp16 on CUDA, fp32 elsewhere (CPU results unchanged)."""
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


def cast(module: Any, device: Any = None, dtype: Any = None) -> Any:
    """`module.to(device, dtype=dtype)`, keeping in fp32 what transformers keeps there when it loads a model in fp16
    (`_keep_in_fp32_modules`: T5's `wo` projections, which overflow in fp16), as `from_pretrained(dtype=...)` does and
    a plain `.to(dtype=...)` does not."""
    import torch

    module.to(device, dtype=dtype)
    if dtype == torch.float16:
        for model in module.modules():
            keep = getattr(model, "_keep_in_fp32_modules", None) or ()
            for name, child in model.named_modules():
                if set(name.split(".")) & set(keep):
                    child.to(dtype=torch.float32)
    return module


def inference_device() -> tuple[Any, Any]:
    """Where inference runs: the device accelerate picks, and its default dtype."""
    from accelerate import PartialState

    device = PartialState().device
    return device, default_dtype(device)


def resolve_precision(requested: str, cuda: bool, cuda_bf16: bool = True) -> str:
    """What mixed precision really runs: CPU autocast has no fp16, so fp16 runs as bf16 there; old GPUs lack bf16."""
    if requested == "fp16" and not cuda:
        return "bf16"
    if requested == "bf16" and cuda and not cuda_bf16:
        return "fp16"
    return requested


def precision_that_runs(requested: str) -> str:
    """finetune.mixed_precision as it runs on this machine's device."""
    import torch

    cuda = torch.cuda.is_available()
    return resolve_precision(requested, cuda, cuda and torch.cuda.is_bf16_supported())


def frozen_dtype(precision: str, device: Any) -> Any:
    """The dtype of the frozen VAE and text encoder while fine-tuning: the half type on a GPU, fp32 on a CPU."""
    import torch

    if device.type == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


ALLOW_CPU = "SKETCH_ALLOW_CPU"
# Images a profile's fine-tune sees with its default sizes (epochs x training images): study 30 x ~9,000, full 1 x 2,700.
GPU_PROFILE_IMAGES = {"study": 270_000, "full": 2_700}
TFLOP_PER_IMAGE = 0.539  # SD2-base UNet forward + backward at 256 px, batch 1 (torch.utils.flop_counter)
CPU_TFLOPS_PER_CORE = 0.05  # an assumption, not a measurement: sustained fp32 throughput of one modern core


def require_gpu(profile: str) -> None:
    """Stop a study-sized profile on a machine without CUDA, with an estimate of the time it would take instead."""
    if profile not in GPU_PROFILE_IMAGES or os.environ.get(ALLOW_CPU) == "1":
        return  # before importing torch: fetching the dataset needs none
    import torch

    if torch.cuda.is_available():
        return
    cores = os.cpu_count() or 1
    days = GPU_PROFILE_IMAGES[profile] * TFLOP_PER_IMAGE / (cores * CPU_TFLOPS_PER_CORE) / 86_400
    raise UserError(
        f"the {profile} profile needs a CUDA GPU: without one its fine-tune alone would take about {days:.1f} days on "
        f"this machine's {cores} CPU cores (an estimate: {GPU_PROFILE_IMAGES[profile]:,} images x {TFLOP_PER_IMAGE} "
        f"TFLOP at {CPU_TFLOPS_PER_CORE * 1000:.0f} GFLOP/s per core); run `make demo` for the offline smoke setting, "
        f"or set {ALLOW_CPU}=1 to go on anyway (it changes no result)")


def load_clip(path: Path, device: Any = "cpu", half: bool = False) -> tuple[Any, Callable, Callable]:
    """Return (model, preprocess, tokenizer) for an open_clip local-dir folder, model in eval mode (fp16 if `half`)."""
    check_clip_folder(path)
    import open_clip

    with user_errors(path, "an open_clip model"):
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{path}", device=device, precision="fp16" if half else "fp32")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.eval(), preprocess, tokenizer


def load_blip(path: Path, device: Any = "cpu", dtype: Any = None) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """Return (model, processor) for a BLIP captioning folder, model in eval mode, in `dtype` (None: the file's)."""
    check_blip_folder(path)
    from transformers import BlipForConditionalGeneration, BlipProcessor

    quiet_libraries()
    with user_errors(path, "a BLIP captioner"):
        model = BlipForConditionalGeneration.from_pretrained(path, use_safetensors=True, dtype=dtype)
        processor = BlipProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def copy_clip(src: Path, out_dir: Path) -> None:
    """Materialise a canonical open_clip folder (config + open_clip_model.safetensors) from `src`."""
    model, _, _ = load_clip(src)
    config = read_json(src / CLIP_CONFIG)
    write_open_clip(out_dir, config, model.state_dict())
    if config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name"):
        # open_clip then reads an HF tokenizer from the folder itself.
        for name in CLIP_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)


def copy_blip(src: Path, out_dir: Path) -> None:
    """Materialise a canonical BLIP captioning folder (model.safetensors + processor files) from `src`."""
    model, processor = load_blip(src)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
