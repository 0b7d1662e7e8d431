"""Stable Diffusion 1.x/2.x: a UNet with epsilon or v prediction on a DDPM schedule, one CLIP text encoder.

Training (the study's recipe): latents x0 = VAE sample * scaling_factor are noised at a uniform random timestep t,
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]), and the UNet regresses eps (or the velocity
v = sqrt(a_t) eps - sqrt(1 - a_t) x0 for v-prediction models). `noise_offset` adds noise_offset * randn(batch,
channels, 1, 1) to eps; `snr_gamma` weights each sample by min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr
(epsilon) or min(snr, gamma) / (snr + 1) (v), snr = a_t / (1 - a_t). Both off draw nothing more from the RNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stylestudy.core.config import SCHEDULERS, UserError
from stylestudy.models import loading
from stylestudy.models.families.base import Conditioning, Family, FrozenEncoders, NoiseProcess, draw_noise

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")


class DDPMNoise(NoiseProcess):
    """DDPM noising with the folder's betas, for epsilon or v prediction."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler  # a DDPMScheduler
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.prediction_type = scheduler.config.prediction_type

    def draw(self, clean: Any, noise_offset: float) -> tuple[Any, Any]:
        import torch

        noise = draw_noise(clean, noise_offset)
        timesteps = torch.randint(0, self.num_train_timesteps, (clean.shape[0],), device=clean.device)
        return noise, timesteps

    def noised(self, clean: Any, noise: Any, timesteps: Any) -> Any:
        return self.scheduler.add_noise(clean, noise, timesteps)

    def target(self, clean: Any, noise: Any, timesteps: Any) -> Any:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(clean, noise, timesteps)

    def loss_weights(self, timesteps: Any, snr_gamma: float) -> Any:
        """None when snr_gamma is 0; else min-SNR-gamma weights, with snr from diffusers' compute_snr."""
        from diffusers.training_utils import compute_snr

        if snr_gamma == 0:
            return None
        snr = compute_snr(self.scheduler, timesteps)
        clipped = snr.clamp(max=snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        raise ValueError(f"min-SNR weighting for prediction_type {self.prediction_type!r} is not defined")

    def predicted_x0(self, noisy: Any, output: Any, timesteps: Any) -> Any:
        """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (epsilon), x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v (v): what
        DDPMScheduler.step calls pred_original_sample."""
        a = self.scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
        if self.prediction_type == "epsilon":
            return (noisy - (1 - a).sqrt() * output) / a.sqrt()
        if self.prediction_type == "v_prediction":
            return a.sqrt() * noisy - (1 - a).sqrt() * output
        raise ValueError(f"the CLIP loss needs an epsilon or v_prediction model, not {self.prediction_type!r}")

    def spread_timesteps(self, n: int) -> Any:
        import torch

        return torch.linspace(0, self.num_train_timesteps - 1, n).round().long()


class StableDiffusion2(Family):
    name = "sd2"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_folder = "unet"
    components, weighted = COMPONENTS, WEIGHTED
    encoder_folders = ("vae/", "text_encoder/", "tokenizer/")
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")  # attention projections, as diffusers' LoRA example
    schedulers = SCHEDULERS["sd2"]
    look_alikes = {"StableDiffusionInpaintPipeline": "an inpainting pipeline (a UNet of 9 input channels)"}
    license = "openrail++"
    license_name = "CreativeML Open RAIL++-M"
    license_link = "https://huggingface.co/stabilityai/stable-diffusion-2/blob/main/LICENSE-MODEL"

    def check_folder(self, path: Path) -> None:
        """An inpainting UNet (latents, mask and masked image: 9 input channels) is refused in one line."""
        super().check_folder(path)
        config = path / "unet" / "config.json"
        if config.is_file() and loading.read_json(config).get("in_channels") == 9:
            raise UserError(f"{config}: a UNet of 9 input channels, an inpainting model, which this project cannot "
                            f"train; params model.family is {self.name}: give a {self.pipeline_class} text-to-image "
                            "folder")

    def load_pipeline(self, path: Path) -> Any:
        from diffusers import StableDiffusionPipeline

        loading.quiet_libraries()
        with loading.user_errors(path, "a Stable Diffusion pipeline"):
            return StableDiffusionPipeline.from_pretrained(
                path, use_safetensors=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def load_encoders(self, path: Path, device: Any, dtype: Any) -> FrozenEncoders:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        loading.quiet_libraries()
        with loading.user_errors(path, "a Stable Diffusion pipeline"):
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        for frozen in (vae, text_encoder):
            frozen.requires_grad_(False).eval().to(device, dtype=dtype)
        return FrozenEncoders(self, vae, (tokenizer,), (text_encoder,), device, dtype)

    def load_denoiser(self, path: Path) -> Any:
        from diffusers import UNet2DConditionModel

        loading.quiet_libraries()
        with loading.user_errors(path, "a Stable Diffusion pipeline"):
            # from the subfolder itself: its saved config names it (_name_or_path), as the pipeline's loader does
            return UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)

    def load_noise_process(self, path: Path) -> DDPMNoise:
        from diffusers import DDPMScheduler

        return DDPMNoise(DDPMScheduler.from_pretrained(path, subfolder="scheduler"))

    def encode_text(self, encoders: FrozenEncoders, texts: list[str]) -> Conditioning:
        import torch

        (tokenizer,), (text_encoder,) = encoders.tokenizers, encoders.text_encoders
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                           return_tensors="pt")
        with torch.no_grad():
            return Conditioning(text_encoder(tokens.input_ids.to(encoders.device), return_dict=False)[0])

    def count_truncated(self, encoders: FrozenEncoders, texts: list[str]) -> int:
        (tokenizer,) = encoders.tokenizers
        ids = tokenizer(texts, truncation=False)["input_ids"]
        return sum(len(one) > tokenizer.model_max_length for one in ids)

    def to_latents(self, vae_config: Any, sample: Any) -> Any:
        return sample * vae_config.scaling_factor

    def from_latents(self, vae_config: Any, latents: Any) -> Any:
        return latents / vae_config.scaling_factor

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, conditioning: Conditioning) -> Any:
        return denoiser(noisy, timesteps, conditioning.sequence, return_dict=False)[0]

    def example_inputs(self, config: dict[str, Any], latent_shape: tuple[int, ...]) -> tuple[Any, Any, Conditioning]:
        """CLIP's 77 tokens."""
        import torch

        batch = latent_shape[0]
        return (torch.randn(latent_shape), torch.full((batch,), 500),
                Conditioning(torch.randn(batch, 77, config["cross_attention_dim"])))

    def sample(self, denoiser: Any, noise: NoiseProcess, conditioning: Conditioning, latent_shape: tuple[int, ...],
               steps: int, guidance_scale: float, seed: int) -> Any:
        """DDIM (eta 0: no noise drawn after the first) with classifier-free guidance."""
        import torch
        from diffusers import DDIMScheduler

        assert isinstance(noise, DDPMNoise)
        device, dtype = conditioning.sequence.device, denoiser.dtype
        # clip_sample: DDPMScheduler's default, meant for pixels; it would clip SD's latents.
        sampler = DDIMScheduler.from_config(noise.scheduler.config, clip_sample=False)
        sampler.set_timesteps(steps, device=device)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(latent_shape, generator=generator).to(device, dtype) * sampler.init_noise_sigma
        both = conditioning.to(device, dtype)
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = self.denoise(denoiser, model_input, t, both).chunk(2)
            x = sampler.step(uncond + guidance_scale * (cond - uncond), t, x, return_dict=False)[0]
        return x

    def use_fused_attention(self, pipe: Any) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        for model in (pipe.unet, pipe.vae):
            model.set_attn_processor(AttnProcessor2_0())

    def fuse_qkv(self, pipe: Any) -> None:
        pipe.fuse_qkv_projections()

    def set_scheduler(self, pipe: Any, name: str) -> None:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

        config = pipe.scheduler.config
        if name == "dpmsolver++":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
            return
        classes = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
        pipe.scheduler = classes[name].from_config(config)

    def encode_prompts(self, pipe: Any, texts: list[str], guidance: bool, device: Any) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            embeds, negative = pipe.encode_prompt(texts, device, 1, guidance)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def save_lora(self, layers: dict[str, Any], folder: Path, weight_name: str, metadata: dict[str, Any]) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        # the UNet's adapter in diffusers' own key format (lora.down/up), as its LoRA training example saves it
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                                  safe_serialization=True, weight_name=weight_name,
                                                  unet_lora_adapter_metadata=metadata)


FAMILY = StableDiffusion2()
