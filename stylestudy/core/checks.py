"""The checks of params.yaml that span several keys or sections, made after every key has passed its own rule
(stylestudy/core/config.py `validate`) and before any stage works: one line each, naming the keys and the remedy."""
from __future__ import annotations

from stylestudy.core.config import (EDIT_HINT, FLOW_MATCHING, SCHEDULERS, SD_VARIANTS, SDXL_BASE, SINGLE_FILE_FAMILIES,
                                    UI_LORA_LAYOUTS, UserError)


def check_across_sections(params: dict) -> None:
    """Every check below, on the whole of a validated params.yaml."""
    check_split_fractions(params)
    check_family_settings(params)
    check_export_settings(params)
    check_memory_settings(params["finetune"])


def check_split_fractions(params: dict) -> None:
    """The split fractions must add up to 1; checked with the rest, before any image is read."""
    fractions = params["split"]["fractions"]
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise UserError(f"params.yaml: split.fractions must sum to 1, got {fractions} (sum "
                        f"{sum(fractions.values()):g}); {EDIT_HINT.format(key='split.fractions.train')}")


def check_family_settings(params: dict) -> None:
    """Settings that the chosen model family cannot honour, refused before any work."""
    family = params["model"]["family"]
    scheduler = params["generate"]["scheduler"]
    if scheduler not in SCHEDULERS[family]:
        raise UserError(f"params.yaml: generate.scheduler {scheduler!r} is not a sampler of model family {family} "
                        f"({', '.join(SCHEDULERS[family])}); {EDIT_HINT.format(key='generate.scheduler')}")
    variant = params["fetch"]["sd"]["variant"]
    if variant != "default" and variant not in SD_VARIANTS.get(family, ()):
        raise UserError(f"params.yaml: fetch.sd.variant {variant!r} is not a model of family {family}; set it to "
                        f"default, or choose its family's model (-S model={variant})")
    if family in FLOW_MATCHING and params["finetune"]["snr_gamma"] > 0:
        raise UserError("params.yaml: finetune.snr_gamma (min-SNR weighting) has no meaning for flow matching (model "
                        f"family {family}): set it to 0 and weight with model.weighting_scheme instead")
    if family == "flux" and params["finetune"]["method"] == "full":
        raise UserError("params.yaml: finetune.method full is refused for model family flux: training every weight "
                        "of the 12B transformer needs 155 GiB as this project trains (fp32 weights, gradients and EMA "
                        "133, 8-bit AdamW states 22) and 66 GiB even all in bf16, before activations; set "
                        "finetune.method: lora (QLoRA on the model.base_quantization base, docs/flux.md)")
    if family == "sdxl" and params["model"]["vae_precision"] == "same" and fp16_somewhere(params) \
            and params["fetch"]["sd"]["source"] == "hub" and params["fetch"]["sd"]["repo_id"] == SDXL_BASE:
        raise UserError(f"params.yaml: model.vae_precision same runs {SDXL_BASE}'s VAE in fp16, where it overflows "
                        "(NaN images): set model.vae_precision to fp32")


def check_memory_settings(p: dict) -> None:
    """The memory options (stylestudy/train/lowmem.py) against the settings they cannot run with, one line each."""
    where = "params.yaml: finetune."
    if p["lora_half_base"] and (p["method"] != "lora" or p["mixed_precision"] == "no"):
        raise UserError(f"{where}lora_half_base holds a LoRA run's frozen base in the mixed-precision dtype: it needs "
                        "method lora and mixed_precision fp16 or bf16 (a full fine-tune: weights_dtype bf16)")
    if p["fused_backward"] and p["gradient_accumulation_steps"] > 1:
        raise UserError(f"{where}fused_backward steps each parameter as soon as its gradient is ready, so gradients "
                        "cannot accumulate: set gradient_accumulation_steps 1 (raise train_batch_size instead)")
    if p["fused_backward"] and p["mixed_precision"] == "fp16":
        raise UserError(f"{where}fused_backward cannot run with mixed_precision fp16: its loss scaler checks every "
                        "gradient for overflow before any step is taken; set mixed_precision bf16")
    if p["fused_backward"] and p["launch"]["num_processes"] > 1:
        raise UserError(f"{where}fused_backward steps each parameter before the processes average its gradient: "
                        "set launch.num_processes 1, or fused_backward false")
    if p["weights_dtype"] == "bf16" and not (p["method"] == "full" and p["fused_backward"]
                                              and p["mixed_precision"] == "bf16"):
        raise UserError(f"{where}weights_dtype bf16 rounds each update stochastically inside the fused step: it needs "
                        "method full, fused_backward true and mixed_precision bf16 (LoRA: lora_half_base)")


def check_export_settings(params: dict) -> None:
    """A file layout the family has no form for is refused before any training."""
    family, export = params["model"]["family"], params["export"]
    if export["lora_layout"] == "kohya" and UI_LORA_LAYOUTS[family] != "kohya":
        raise UserError(f"params.yaml: export.lora_layout kohya is a UNet layout; model family {family}'s LoRA loads in "
                        f"ComfyUI in the {UI_LORA_LAYOUTS[family]} layout: set it to auto or "
                        f"{UI_LORA_LAYOUTS[family]}")
    if export["checkpoint"] == "single_file" and family not in SINGLE_FILE_FAMILIES:
        raise UserError(f"params.yaml: export.checkpoint single_file is not built for model family {family} (only "
                        f"{', '.join(SINGLE_FILE_FAMILIES)}): set it to auto or none; the diffusers folder "
                        "models/finetuned loads as it is")


def fp16_somewhere(params: dict) -> bool:
    """Whether the frozen encoders (encode.mixed_precision) or generation (generate.dtype; auto is fp16 on a GPU) may
    run in fp16."""
    return params["encode"]["mixed_precision"] == "fp16" or params["generate"]["dtype"] in ("fp16", "auto")
