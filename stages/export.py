"""export: the fine-tuned model in the files where people draw with it (ComfyUI, AUTOMATIC1111/Forge, diffusers).

Reads FINETUNED_DIR (finetune's pipeline folder: its training_info.json says the method, its lora/ the adapter),
BASE_DIR (the pretrained pipeline the adapter was trained on: its name and hash go into the LoRA's metadata) and
params `export` and `model` (the family: FINETUNED_DIR must be one of its pipelines). Writes OUT_DIR, atomically:
- with LoRA: `sketch-<family>-lora.safetensors`, the adapter in the layout the UIs load for the family (kohya's for
  the UNet families, diffusers' for SD3; `export.lora_layout`), and `pytorch_lora_weights.safetensors`, diffusers'
  own file as finetune wrote it;
- with a full fine-tune (or `export.checkpoint: single_file`): `sketch-<family>.safetensors`, the whole pipeline in
  the original single-file layout in `export.checkpoint_dtype` (SD2, SDXL);
- README.md, the model card with a section on using these files; export.json, what was written.
Every .safetensors header carries the ModelSpec keys and, for a LoRA, rank, alpha and the base model's name and hash;
no token and no local path; modelspec.date is the day the stage runs (UTC) with `export.date: today`, a fixed date
(then the bytes written are a function of the inputs alone) or left out with none. No pickle.

Run: python -m stages.export FINETUNED_DIR BASE_DIR OUT_DIR
Example: python -m stages.export models/finetuned models/pretrained/sd models/export
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

from stylestudy.core.config import SINGLE_FILE_FAMILIES, UI_LORA_LAYOUTS, cli, load_params, parse_args, require_path
from stylestudy.core.outputs import atomic_dir, sha256_of, sort_safetensors_metadata, write_json
from stylestudy.models import export, families, loading, single_file
from stylestudy.models.families import Family
from stylestudy.train import modelcard
from stylestudy.train.lora import ADAPTER_FILE

log = logging.getLogger(__name__)
ADAPTER_DIR = "lora"  # finetune's OUT_DIR/lora/


def save(weights: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(path), metadata=metadata)
    sort_safetensors_metadata(path)


def base_identity(base: Path, info: dict, family: Family) -> tuple[str, str]:
    """The base model's name (its Hub id, else its source) and the SHA-256 of its denoiser's weights."""
    origin = info.get("base_model", {})
    name = origin.get("repo_id") if origin.get("source") == "hub" else f"{origin.get('source', 'unknown')} " \
        f"{family.name} (random weights, seed {origin.get('seed')})"
    files = sorted((base / family.denoiser_folder).glob("*.safetensors"))
    digest = sha256_of(files[0]) if len(files) == 1 else ",".join(sha256_of(f) for f in files)
    return str(name), digest


def lora_layout(p: dict, family: Family) -> str:
    return UI_LORA_LAYOUTS[family.name] if p["lora_layout"] == "auto" else p["lora_layout"]


def wants_checkpoint(p: dict, family: Family, method: str) -> bool:
    if p["checkpoint"] == "auto":
        return method == "full" and family.name in SINGLE_FILE_FAMILIES
    return p["checkpoint"] == "single_file"


def write_lora(tmp: Path, folders: dict[str, Path], family: Family, spec: dict[str, str], layout: str) -> list[str]:
    """The adapter's files: diffusers' own, and the UI layout's where it differs."""
    from safetensors import safe_open

    source = require_path(folders["finetuned"] / ADAPTER_DIR / ADAPTER_FILE, "rerun finetune with method lora")
    adapter = export.read_adapter(source)
    info = loading.read_json(folders["finetuned"] / "training_info.json")
    extra = export.lora_metadata(adapter, *base_identity(folders["base"], info, family))
    with safe_open(str(source), "pt") as handle:
        own = dict(handle.metadata() or {})
    save(adapter.layers, tmp / ADAPTER_FILE, own | spec | extra)
    written = [ADAPTER_FILE]
    if layout == "kohya":
        modules = export.denoiser_modules(folders["finetuned"] / family.denoiser_folder)
        name = f"sketch-{family.name}-lora.safetensors"
        save(export.to_kohya(adapter, modules), tmp / name, spec | extra)
        written.append(name)
    elif layout == "diffusers" and UI_LORA_LAYOUTS[family.name] == "diffusers":
        name = f"sketch-{family.name}-lora.safetensors"  # the same layout, under the name a UI's folder shows
        save(adapter.layers, tmp / name, own | spec | extra)
        written.append(name)
    return written


def export_date(setting: Any) -> str:
    """modelspec.date for `export.date`: today's UTC date for "today", else the setting ("none" or a fixed date)."""
    if setting == "today":
        return datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return str(setting)


def run(folders: dict[str, Path], p: dict, family: Family) -> dict:
    """Write OUT_DIR; return what export.json records."""
    finetuned = folders["finetuned"]
    families.check_pipeline_folder(finetuned, family)
    info = loading.read_json(require_path(finetuned / "training_info.json", "run the finetune stage first"))
    method = info["params"]["method"]
    spec = {"title": f"sketch-{family.name}", "date": export_date(p["date"]), "resolution": info["encode"]["resolution"],
            "licence": family.license_name}
    files: dict[str, str] = {}
    with atomic_dir(folders["out"]) as tmp:
        if method == "lora":
            layout = lora_layout(p, family)
            lora_spec = export.modelspec(family.name, finetuned, spec["title"] + "-lora", spec["date"],
                                         spec["resolution"], spec["licence"], lora=True)
            files |= {name: "lora" for name in write_lora(tmp, folders, family, lora_spec, layout)}
        if wants_checkpoint(p, family, method):
            weights = export.cast(single_file.CHECKPOINTS[family.name](finetuned), p["checkpoint_dtype"])
            name = f"sketch-{family.name}.safetensors"
            save(weights, tmp / name, export.modelspec(family.name, finetuned, spec["title"], spec["date"],
                                                       spec["resolution"], spec["licence"], lora=False))
            files[name] = "checkpoint"
        card = (finetuned / "README.md").read_text(encoding="utf-8") if (finetuned / "README.md").is_file() else ""
        (tmp / "README.md").write_text(card + modelcard.ui_usage_text(family, files), encoding="utf-8")
        summary = {"family": family.name, "method": method, "files": files, "params": p}
        write_json(tmp / "export.json", summary)
    log.info("wrote %s: %s", folders["out"], ", ".join(files) or "no model file (nothing to export)")
    return summary


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "finetuned": "the fine-tuned pipeline folder (models/finetuned)",
        "base": "the pretrained pipeline folder (models/pretrained/sd)",
        "out": "the folder to write (models/export)",
    })
    p, family = load_params("export"), families.from_params(load_params("model"))
    run({"finetuned": args.finetuned, "base": args.base, "out": args.out}, p, family)


if __name__ == "__main__":
    main()
