"""Stable Diffusion XL: a UNet on SD2's DDPM noise process, conditioned on two CLIP text encoders and on the image's size.

Training follows diffusers' SDXL scripts (examples/text_to_image/train_text_to_image_sdxl.py and its LoRA variant):
the sequence conditioning is both text encoders' penultimate hidden states side by side (CLIP-L 768 + OpenCLIP bigG
1280 = 2048 wide), the pooled one the second encoder's projected embedding (1280), and the UNet's micro-conditioning
the six "time ids" of every training image: its original (height, width), the crop's top-left corner in the resized
image, and the target (height, width) (Podell et al. 2023, "SDXL", section 2.2) — here each sample's crop record
(`Conditioning.crops`, dataset.TrainTransform.framed), cached with the latents or computed with every random crop.
Noise, targets, min-SNR and offset noise are SD2's (sd2.DDPMNoise: epsilon, or v-prediction where the folder's
scheduler says so); validation samples with DDIM and generation with the pipeline, both at the target size's time
ids (original size = target size, crop 0, 0), as StableDiffusionXLPipeline does.

SDXL's VAE overflows in fp16 (NaN latents and images): with `model.vae_precision: fp32` (the default) the VAE stays
in fp32 in the encode stage, validation and generate whatever the other components' precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylestudy.core.config import SCHEDULERS, UserError
from stylestudy.models import loading
from stylestudy.models.families.base import Conditioning, FrozenEncoders
from stylestudy.models.families.sd2 import StableDiffusion2

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
WEIGHTED = ("unet", "vae", *TEXT_ENCODERS)
COMPONENTS = (*WEIGHTED, *TOKENIZERS, "scheduler")
WHAT = "a Stable Diffusion XL pipeline"


@dataclass(frozen=True)
class XLSettings:
    """params `model` of the sdxl family."""

    vae_precision: str = "fp32"  # fp32, or same: the precision of the other frozen components (an fp16-safe VAE)


class StableDiffusionXL(StableDiffusion2):
    """SDXL base: SD2's noise process, schedulers and latent scaling; its own encoders, conditioning and pipeline."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    components, weighted = COMPONENTS, WEIGHTED
    encoder_folders = ("vae/", "text_encoder/", "text_encoder_2/", "tokenizer/", "tokenizer_2/")
    look_alikes = {"StableDiffusionXLImg2ImgPipeline": "an SDXL refiner or image-to-image pipeline",
                   "StableDiffusionXLInpaintPipeline": "an SDXL inpainting pipeline"}
    schedulers = SCHEDULERS["sdxl"]
    license = "openrail++"
    license_name = "CreativeML Open RAIL++-M"
    license_link = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md"

    def __init__(self, settings: XLSettings = XLSettings()) -> None:
        self.settings = settings

    def encoding_settings(self) -> dict[str, Any]:
        return {"model.vae_precision": self.settings.vae_precision}

    def vae_dtype(self, dtype: Any) -> Any:
        """The VAE's dtype when the other components run in `dtype`."""
        import torch

        return torch.float32 if self.settings.vae_precision == "fp32" else dtype

    def check_folder(self, path: Path) -> None:
        """A refiner saved as a text-to-image folder has no text_encoder/ (it reads OpenCLIP bigG only): said so."""
        if not (path / "text_encoder").is_dir() and (path / "text_encoder_2").is_dir():
            raise UserError(f"{path}: no text_encoder/ beside text_encoder_2/: an SDXL refiner's layout, which this "
                            f"project cannot train; params model.family is {self.name}: give a {self.pipeline_class} "
                            "base folder (stabilityai/stable-diffusion-xl-base-1.0)")
        super().check_folder(path)

    def load_pipeline(self, path: Path) -> Any:
        from diffusers import StableDiffusionXLPipeline

        loading.quiet_libraries()
        with loading.user_errors(path, WHAT):
            # no invisible watermark: generate decodes the latents itself, and the study's images stay unmarked
            return StableDiffusionXLPipeline.from_pretrained(path, use_safetensors=True, add_watermarker=False)

    def cast(self, pipe: Any, dtype: Any) -> None:
        super().cast(pipe, dtype)
        pipe.vae.to(dtype=self.vae_dtype(dtype))

    def load_encoders(self, path: Path, device: Any, dtype: Any) -> FrozenEncoders:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        loading.quiet_libraries()
        with loading.user_errors(path, WHAT):
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
            encoders = (CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True),
                        CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                    use_safetensors=True))
            tokenizers = tuple(CLIPTokenizer.from_pretrained(path, subfolder=name) for name in TOKENIZERS)
        for frozen in encoders:
            frozen.requires_grad_(False).eval().to(device, dtype=dtype)
        vae.requires_grad_(False).eval().to(device, dtype=self.vae_dtype(dtype))
        return FrozenEncoders(self, vae, tokenizers, encoders, device, dtype)

    def prompt_encoder(self, encoders: FrozenEncoders) -> Any:
        """A pipeline holding the text encoders only: diffusers' own encode_prompt joins the two encoders."""
        from diffusers import StableDiffusionXLPipeline

        kwargs = dict(zip(TEXT_ENCODERS, encoders.text_encoders)) | dict(zip(TOKENIZERS, encoders.tokenizers))
        return StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, add_watermarker=False, **kwargs)

    def encode_text(self, encoders: FrozenEncoders, texts: list[str]) -> Conditioning:
        import torch

        with torch.no_grad():
            sequence, _, pooled, _ = self.prompt_encoder(encoders).encode_prompt(
                texts, device=encoders.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(sequence, pooled)

    def count_truncated(self, encoders: FrozenEncoders, texts: list[str]) -> int:
        tokenizer = encoders.tokenizers[0]  # both read 77 tokens of the same BPE vocabulary
        ids = tokenizer(texts, truncation=False)["input_ids"]
        return sum(len(one) > tokenizer.model_max_length for one in ids)

    def example_inputs(self, config: dict[str, Any], latent_shape: tuple[int, ...]) -> tuple[Any, Any, Conditioning]:
        """SD2's, with the second encoder's pooled embeddings and each sample's crop record (a whole image)."""
        import torch

        latents, timesteps, text = super().example_inputs(config, latent_shape)
        batch, pixels = latent_shape[0], 8 * latent_shape[-1]
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        crops = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch)
        return latents, timesteps, Conditioning(text.sequence, torch.randn(batch, pooled), crops)

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, conditioning: Conditioning) -> Any:
        if conditioning.crops is None:
            raise ValueError("SDXL's UNet needs each sample's crop record (Conditioning.with_crops): its time ids")
        added = {"text_embeds": conditioning.pooled, "time_ids": conditioning.crops}
        return denoiser(noisy, timesteps, conditioning.sequence, added_cond_kwargs=added, return_dict=False)[0]

    def encode_prompts(self, pipe: Any, texts: list[str], guidance: bool, device: Any) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def save_lora(self, layers: dict[str, Any], folder: Path, weight_name: str, metadata: dict[str, Any]) -> None:
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        # the UNet's adapter in diffusers' key format, as its SDXL LoRA training example saves it
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                                    safe_serialization=True, weight_name=weight_name,
                                                    unet_lora_adapter_metadata=metadata)


FAMILY = StableDiffusionXL()
