"""A fine-tuned model in the files UIs load: its LoRA in each family's UI layout, its pipeline as one original-layout
checkpoint (single_file.py), each with ModelSpec metadata in its safetensors header.

Per family (one entry each in UI_LORA_LAYOUTS of stylestudy/core/config.py, and in single_file.CHECKPOINTS where it has
a single-file layout): the UNet families' adapters go to kohya's layout (`lora_unet_<module path with _>.lora_down
.weight`, `.lora_up.weight`, `.alpha`), the only one ComfyUI and AUTOMATIC1111 map for UNet models, by diffusers'
`convert_state_dict_to_kohya`; SD3's and FLUX's stay in diffusers' layout (`transformer.<module>.lora_A.weight` /
`lora_B`), which ComfyUI's LoRA key map reads for both (docs/export.md).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylestudy.models import loading

LORA_METADATA = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the adapter's peft config
KOHYA_KEY = re.compile(r"lora_unet_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# ModelSpec (Stability AI's sai_model_spec 1.0.0) architecture ids; a LoRA's is the base's with "/lora"
ARCHITECTURES = {"sd2": {"epsilon": "stable-diffusion-v2-512", "v_prediction": "stable-diffusion-v2-768-v"},
                 "sdxl": {"epsilon": "stable-diffusion-xl-v1-base"},
                 "flux": {"epsilon": "flux-1-dev"}}  # a flow-matching scheduler names no prediction type
SD3_ARCHITECTURES = {False: "stable-diffusion-v3-medium", True: "stable-diffusion-v3.5-medium"}
IMPLEMENTATIONS = {"sd2": "https://github.com/Stability-AI/stablediffusion",
                   "sdxl": "https://github.com/Stability-AI/generative-models", "sd3": "diffusers",
                   "flux": "https://github.com/black-forest-labs/flux"}


@dataclass(frozen=True)
class Adapter:
    """A LoRA as finetune saved it: diffusers' state dict (prefixed `unet.` / `transformer.`), rank and alpha."""

    layers: dict[str, Any]
    rank: int
    alpha: float
    prefix: str


def read_adapter(path: Path) -> Adapter:
    """The adapter file finetune wrote (diffusers' layout, its peft config in the metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as handle:
        config = json.loads((handle.metadata() or {}).get(LORA_METADATA, "{}"))
    layers = load_file(path)
    prefix = next(iter(layers)).split(".")[0]
    if config.get(f"{prefix}.rank_pattern") or config.get(f"{prefix}.alpha_pattern"):
        raise ValueError(f"{path}: per-module ranks or alphas, which finetune never writes")
    return Adapter(layers, int(config[f"{prefix}.r"]), float(config[f"{prefix}.lora_alpha"]), prefix)


def denoiser_modules(folder: Path) -> set[str]:
    """The denoiser's module paths, from its safetensors headers (no weights read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            names |= {key.rpartition(".")[0] for key in handle.keys()}
    return names


def to_kohya(adapter: Adapter, modules: set[str]) -> dict[str, Any]:
    """The adapter in kohya's layout, each module's alpha the adapter's; every key checked against the layout and
    against the denoiser's `modules` (ValueError for one left out, malformed or naming no module)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    peft = convert_unet_state_dict_to_peft({k.removeprefix(f"{adapter.prefix}."): v
                                            for k, v in adapter.layers.items()})
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft.items()})
    for key in [k for k in kohya if k.endswith(".alpha")]:  # the library writes alpha = rank: the run's alpha instead
        kohya[key] = torch.tensor(adapter.alpha)
    check_kohya(kohya, adapted_modules(adapter.layers), modules)
    return kohya


def adapted_modules(layers: dict[str, Any]) -> set[str]:
    """The module paths an adapter state dict changes (diffusers' lora.down/up or peft's lora_A/B keys)."""
    return {re.sub(r"\.lora[._](down|up|A|B)\.weight$", "", k) for k in layers}


def check_kohya(kohya: dict[str, Any], adapted: set[str], modules: set[str]) -> None:
    """Every key in kohya's form, each module with its down, up and alpha, one per adapted module, each naming a
    module of the denoiser (as the UIs map `lora_unet_` + the module path with underscores)."""
    bad = [k for k in kohya if not KOHYA_KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"kohya export: {len(bad)} keys not in kohya's layout, e.g. {bad[0]!r}")
    names = {k.rpartition(".")[0].removesuffix(".lora_down").removesuffix(".lora_up") for k in kohya}
    incomplete = sorted(n for n in names if any(f"{n}.{part}" not in kohya for part in KOHYA_PARTS))
    if incomplete:
        raise ValueError(f"kohya export: {incomplete[0]} lacks one of {', '.join(KOHYA_PARTS)}")
    if len(names) != len(adapted):
        raise ValueError(f"kohya export: {len(adapted)} adapted modules, {len(names)} kohya modules")
    by_kohya = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
    unknown = sorted(n for n in names if n not in by_kohya)
    if unknown:
        raise ValueError(f"kohya export: {unknown[0]} names no module of the denoiser")


def architecture(family: str, folder: Path) -> str:
    """The ModelSpec architecture of a pipeline folder of `family`."""
    if family == "sd3":
        config = loading.read_json(folder / "transformer" / "config.json")
        return SD3_ARCHITECTURES[bool(config.get("dual_attention_layers"))]
    prediction = loading.read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
    return ARCHITECTURES[family][prediction]


def modelspec(family: str, folder: Path, title: str, date: str, resolution: int, licence: str,
              lora: bool) -> dict[str, str]:
    """The ModelSpec keys of a file of this model (the base's architecture, "/lora" for an adapter); `date` "none"
    leaves modelspec.date out (a SHOULD key of the spec)."""
    spec = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture(family, folder) + ("/lora" if lora else ""),
            "modelspec.implementation": IMPLEMENTATIONS[family], "modelspec.title": title,
            "modelspec.resolution": f"{resolution}x{resolution}", "modelspec.license": licence}
    return spec if date == "none" else spec | {"modelspec.date": date}


def lora_metadata(adapter: Adapter, base_name: str, base_hash: str) -> dict[str, str]:
    """What kohya's trainer records and the UIs show for a LoRA: rank, alpha, the base model's name and hash."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(adapter.rank),
            "ss_network_alpha": f"{adapter.alpha:g}", "ss_sd_model_name": base_name,
            "stylestudy.base_denoiser_sha256": base_hash}


def cast(weights: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Floating tensors in `dtype` (fp16, bf16, fp32), contiguous (safetensors refuses views)."""
    import torch

    target = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
