"""Versatile Diffusion (Xu et al. 2022, shi-labs/versatile-diffusion): a baseline generator beside the base and the
fine-tuned model, never fine-tuned. diffusers ships its text-to-image pipeline among the deprecated ones.

VD keeps one UNet per data type (image_unet, text_unet, a "flat" UNet for text latents) and one set of cross-attention
blocks per context type: the image_unet on the Hub holds the image-context (CLIP image embedding) attention, the
text_unet the text-context one. VersatileDiffusionTextToImagePipeline swaps the two sets when it is built, so that the
image UNet attends to text. Our canonical folder (`convert`) is that pipeline saved after the swap without the
text_unet (`remove_unused_weights`): the image_unet in it already attends to text, model_index.json names no text_unet,
and loading it swaps nothing (loading a saved pipeline that still had its text_unet would swap back, silently).

diffusers 0.42.1 cannot load the text_unet through the pipeline's from_pretrained: its class UNetFlatConditionModel
lives only in diffusers.pipelines.deprecated.versatile_diffusion, and the loader looks it up where model_index.json
says: `["diffusers", ...]`, as diffusers itself saves it, fails with "`diffusers` has no class
`UNetFlatConditionModel`"; the Hub repository's `["versatile_diffusion", ...]`, no pipeline module any more, with
"versatile_diffusion is not one of the libraries Diffusers can load components from"; and it refuses the model even
when passed in (`text_unet=...`: "module diffusers has no attribute UNetFlatConditionModel"). `convert` loads the
pipeline with text_unet=None, the text_unet from its subfolder, and builds the pipeline anew from both (which swaps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stylestudy.core.config import SCHEDULERS, UserError
from stylestudy.models import loading
from stylestudy.models.families.base import Generator

COMPONENTS = ("image_unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("image_unet", "vae", "text_encoder")
SOURCE_CLASSES = ("VersatileDiffusionPipeline", "VersatileDiffusionTextToImagePipeline")  # the Hub's, ours
SHIPPED = "shipped"  # generate.scheduler's value in the manifest when VD keeps the scheduler of its folder


class VersatileDiffusion(Generator):
    name = "vd"
    pipeline_class = "VersatileDiffusionTextToImagePipeline"
    denoiser_folder = "image_unet"
    schedulers = SCHEDULERS["sd2"]  # a DDPM-type model: the sd2 samplers apply; any other keeps its own

    def runnable(self, p: dict) -> dict:
        """The pipeline takes prompts, never embeddings: memory `sequential` (encode every prompt first) runs as
        `none` (VD fits a 16 GB card in fp16); a scheduler of another family (flow_euler) leaves VD's own."""
        memory = "none" if p["memory"] == "sequential" else p["memory"]
        scheduler = p["scheduler"] if p["scheduler"] in self.schedulers else SHIPPED
        return p | {"memory": memory, "scheduler": scheduler}

    def check_folder(self, path: Path) -> None:
        for component in COMPONENTS:
            if not (path / component).is_dir():
                raise UserError(f"{path}: missing the {component}/ folder of the Versatile Diffusion pipeline; "
                                "re-create it with dvc repro fetch@vd")
        for component in WEIGHTED:
            loading.require_safetensors(path / component)

    def load_pipeline(self, path: Path) -> Any:
        from diffusers import VersatileDiffusionTextToImagePipeline

        loading.quiet_libraries()
        with loading.user_errors(path, "a Versatile Diffusion text-to-image pipeline"):
            return VersatileDiffusionTextToImagePipeline.from_pretrained(path, use_safetensors=True)

    def from_latents(self, vae_config: Any, latents: Any) -> Any:
        return latents / vae_config.scaling_factor

    def use_fused_attention(self, pipe: Any) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        for model in (pipe.image_unet, pipe.vae):
            model.set_attn_processor(AttnProcessor2_0())

    def fuse_qkv(self, pipe: Any) -> None:
        pipe.image_unet.fuse_qkv_projections()  # the pipeline has no fuse_qkv_projections of its own
        pipe.vae.fuse_qkv_projections()

    def set_scheduler(self, pipe: Any, name: str) -> None:
        from diffusers import PNDMScheduler

        from stylestudy.models.families import sd2

        if name == "pndm":  # PLMS as SD2's folder configures it; VD's DDIM config would also run Runge-Kutta steps
            pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
        elif name != SHIPPED:
            sd2.FAMILY.set_scheduler(pipe, name)

    def encode_prompts(self, pipe: Any, texts: list[str], guidance: bool, device: Any) -> dict[str, Any]:
        raise NotImplementedError("VersatileDiffusionTextToImagePipeline takes prompts only (runnable: memory none)")


GENERATOR = VersatileDiffusion()


def convert(src: Path, out: Path) -> None:
    """Write the canonical text-to-image folder (attention swapped, no text_unet) from a folder in the Hub's layout
    (image_unet and text_unet, safetensors)."""
    from diffusers import VersatileDiffusionTextToImagePipeline
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    loading.require_dir(src, "a Versatile Diffusion folder")
    index = src / "model_index.json"
    found = loading.read_json(index).get("_class_name") if index.is_file() else None
    if found not in SOURCE_CLASSES:
        raise UserError(f"{src}: model_index.json's _class_name is {found!r}, expected one of {SOURCE_CLASSES}; "
                        "give a Versatile Diffusion folder (shi-labs/versatile-diffusion's layout)")
    for component in (*WEIGHTED, "text_unet"):
        loading.require_dir(src / component, f"the {component}")
        loading.require_safetensors(src / component)
    loading.quiet_libraries()
    with loading.user_errors(src, "a Versatile Diffusion folder"):
        # the loader refuses the text_unet even when given it ("has no class"): given None, then built anew, which swaps
        loaded = VersatileDiffusionTextToImagePipeline.from_pretrained(src, text_unet=None, use_safetensors=True)
        text_unet = UNetFlatConditionModel.from_pretrained(src / "text_unet", use_safetensors=True)
    pipe = VersatileDiffusionTextToImagePipeline(**(loaded.components | {"text_unet": text_unet}))
    pipe.remove_unused_weights()
    pipe.save_pretrained(out, safe_serialization=True)
