"""What the pipeline asks of a model family, and the records that travel between it and the rest.

A family (Stable Diffusion 1.x/2.x: sd2; Stable Diffusion 3: sd3; SDXL: sdxl; FLUX.1: flux) is one module with one
`Family` subclass, which may build on another's (SDXL on sd2's; SD3 and FLUX on flow.py's flow matching). `encode`, `finetune`, validation, `generate` and the learning check talk to the family only, so they never
branch on the architecture:
- the pipeline folder: check it (refusing another family's in one line), load it, save a fine-tuned one;
- the frozen encoders (`FrozenEncoders`): captions into the denoiser's conditioning (`Conditioning`: sequence and,
  where the family has them, pooled embeddings, however many text encoders), pixels to and from scaled latents;
- the training noise process (`NoiseProcess`): draw timesteps, noise the latents, the target, per-sample loss
  weights, the one-step x0 estimate;
- the denoiser's forward pass, the modules LoRA targets and how an adapter is saved, and sampling for validation.
`Generator` is the part `generate` needs alone (a family is one); Versatile Diffusion, a baseline that is never
fine-tuned, is a generator only (vd.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on, one row per sample: sequence embeddings (rows x tokens x width), pooled
    embeddings (rows x width) for families that have them, and each sample's crop record (rows x 6: original height
    and width, crop top and left, target height and width; dataset.TrainTransform.framed), which SDXL takes as its
    micro-conditioning time ids and the other families ignore. The encode stage caches the embeddings per caption;
    the crops belong to the image (and its flip) and are attached per sample (`with_crops`)."""

    sequence: Any
    pooled: Any = None
    crops: Any = None

    def to(self, device: Any, dtype: Any = None, non_blocking: bool = False) -> Conditioning:
        def move(t: Any, cast: Any = dtype) -> Any:
            return None if t is None else t.to(device, dtype=cast, non_blocking=non_blocking)

        # crops keep their dtype: sizes above 256 (bf16) or 2048 (fp16) would round
        return Conditioning(move(self.sequence), move(self.pooled), move(self.crops, None))

    def with_crops(self, crops: Any) -> Conditioning:
        """These rows with each sample's crop record."""
        return Conditioning(self.sequence, self.pooled, crops)

    def rows(self, index: Any) -> Conditioning:
        """The rows at `index` (a tensor or slice of row numbers)."""
        def pick(t: Any) -> Any:
            return None if t is None else t[index]

        return Conditioning(self.sequence[index], pick(self.pooled), pick(self.crops))

    def repeat(self, times: int) -> Conditioning:
        """All rows, `times` times over (row k * n + i is row i)."""
        def tile(t: Any) -> Any:
            return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

        return Conditioning(tile(self.sequence), tile(self.pooled), tile(self.crops))

    def tensors(self) -> dict[str, Any]:
        """The tensors by name, as the encode stage stores them (`text` is the sequence; crops are the images')."""
        return {"text": self.sequence} | ({} if self.pooled is None else {"pooled": self.pooled})

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> Conditioning:
        return cls(tensors["text"], tensors.get("pooled"))

    @classmethod
    def cat(cls, parts: list[Conditioning]) -> Conditioning:
        import torch

        def join(name: str) -> Any:
            return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])

        return cls(join("sequence"), join("pooled"), join("crops"))


@dataclass(frozen=True)
class FrozenEncoders:
    """The frozen parts that turn images and captions into the denoiser's inputs: the VAE and the text encoders
    (with their tokenizers), on one device in one dtype."""

    family: Family
    vae: Any
    tokenizers: tuple[Any, ...]
    text_encoders: tuple[Any, ...]
    device: Any
    dtype: Any

    def encode_text(self, texts: list[str]) -> Conditioning:
        """The conditioning of each text, computed without gradients."""
        return self.family.encode_text(self, texts)

    def latent_distribution(self, pixels: Any) -> Any:
        """The VAE's latent distribution of pixels in [-1, 1] (unscaled), without gradients."""
        import torch

        with torch.no_grad():
            # the VAE's own dtype: a family may keep it in fp32 (SDXL's overflows in fp16)
            return self.vae.encode(pixels.to(self.device, dtype=self.vae.dtype)).latent_dist


def draw_noise(clean: Any, noise_offset: float) -> Any:
    """Gaussian noise like `clean`, from the global (seeded) RNG; with noise_offset > 0, plus noise_offset times one
    draw per sample and channel (the offset-noise trick); off, nothing more is drawn."""
    import torch

    noise = torch.randn_like(clean)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((*clean.shape[:2], 1, 1), device=clean.device, dtype=clean.dtype)
    return noise


class NoiseProcess(ABC):
    """How training noises clean latents and what the denoiser learns to predict."""

    num_train_timesteps: int

    @abstractmethod
    def draw(self, clean: Any, noise_offset: float) -> tuple[Any, Any]:
        """Noise like `clean` and one timestep per sample, from the global (seeded) RNG."""

    @abstractmethod
    def noised(self, clean: Any, noise: Any, timesteps: Any) -> Any:
        """The denoiser's input x_t."""

    @abstractmethod
    def target(self, clean: Any, noise: Any, timesteps: Any) -> Any:
        """What the denoiser's output is regressed on."""

    @abstractmethod
    def loss_weights(self, timesteps: Any, snr_gamma: float) -> Any:
        """Per-sample weights of the squared error, or None for the plain mean."""

    @abstractmethod
    def predicted_x0(self, noisy: Any, output: Any, timesteps: Any) -> Any:
        """The one-step estimate of the clean latents from the denoiser's output."""

    @abstractmethod
    def spread_timesteps(self, n: int) -> Any:
        """n timesteps spread evenly over the whole schedule (validation's fixed noise levels)."""


class Generator(ABC):
    """What `generate` asks of a model: check and load its pipeline folder, place it, set its sampler, encode prompts
    and decode latents. A model family is one; so is a baseline that is never fine-tuned (Versatile Diffusion)."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # model_index.json's _class_name
    denoiser_folder: ClassVar[str]  # unet, transformer
    schedulers: ClassVar[tuple[str, ...]]  # generate.scheduler's choices

    def runnable(self, p: dict) -> dict:
        """params `generate` as this generator runs them (what the manifest records); families run them as given."""
        return p

    def generation_kwargs(self) -> dict[str, Any]:
        """Keywords the pipeline's __call__ takes from this family's settings."""
        return {}

    @abstractmethod
    def check_folder(self, path: Path) -> None:
        """Cheap checks of a pipeline folder of this family (one-line UserError)."""

    @abstractmethod
    def load_pipeline(self, path: Path) -> Any:
        """The whole pipeline (safetensors only), for generation."""

    @abstractmethod
    def from_latents(self, vae_config: Any, latents: Any) -> Any:
        """The inverse of to_latents: what the VAE's decoder takes."""

    @abstractmethod
    def use_fused_attention(self, pipe: Any) -> None:
        """Make the pipeline's attention run torch's scaled_dot_product_attention (flash / memory-efficient kernels)."""

    @abstractmethod
    def fuse_qkv(self, pipe: Any) -> None:
        """One projection for q, k and v in the denoiser's attention."""

    @abstractmethod
    def set_scheduler(self, pipe: Any, name: str) -> None:
        """Replace the pipeline's sampler by `name` (one of `schedulers`), keeping the model's noise schedule."""

    @abstractmethod
    def encode_prompts(self, pipe: Any, texts: list[str], guidance: bool, device: Any) -> dict[str, Any]:
        """The pipeline's prompt embeddings of `texts` (and of "" for guidance) computed on `device`, as keywords of its
        __call__."""

    def cast(self, pipe: Any, dtype: Any) -> None:
        """The loaded pipeline in `dtype` (generate.dtype), keeping in fp32 what transformers keeps there in fp16
        (T5's wo: not pipe.to(dtype=...), which casts it too); a family may keep a component in another."""
        import torch

        from stylestudy.models import loading

        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                loading.cast(component, dtype=dtype)

    def denoiser_of(self, pipe: Any) -> Any:
        """The denoiser of a loaded pipeline."""
        return getattr(pipe, self.denoiser_folder)


class Family(Generator):
    """One model family: everything the pipeline asks of a model of that architecture (training too)."""

    encoder_folders: ClassVar[tuple[str, ...]]  # the folders an encoding is made from ("vae/", ...)
    lora_targets: ClassVar[tuple[str, ...]]
    license: ClassVar[str]  # the base model's licence: model card front matter, name and link for the card's text
    license_name: ClassVar[str]
    license_link: ClassVar[str]
    components: ClassVar[tuple[str, ...]]  # the pipeline folder's subfolders
    weighted: ClassVar[tuple[str, ...]]  # those that hold weights (safetensors only)
    # model_index.json classes of this family's kin that it cannot train, and what each is (refused in one line)
    look_alikes: ClassVar[dict[str, str]] = {}

    def check_folder(self, path: Path) -> None:
        """Every component there, weights in safetensors (one-line UserError)."""
        from stylestudy.core.config import UserError
        from stylestudy.models import loading

        for component in self.components:
            if not (path / component).is_dir():
                raise UserError(f"{path}: missing the {component}/ folder of the pipeline; re-create or re-download it")
        for component in self.weighted:
            loading.require_safetensors(path / component)

    settings: Any = None  # a family with settings: the frozen dataclass of params `model` beyond `family`

    def configured(self, params: dict) -> Family:
        """This family with the settings of params `model` (validated); families without settings return self."""
        if self.settings is None:
            return self
        return type(self)(type(self.settings)(**{k: v for k, v in params.items() if k != "family"}))

    def recorded(self) -> dict[str, Any]:
        """params `model` as it ran, by params name: a checkpoint made with other values is not resumed."""
        from dataclasses import asdict

        settings = {} if self.settings is None else asdict(self.settings)
        return {"model.family": self.name} | {f"model.{k}": v for k, v in settings.items()}

    def encoding_settings(self) -> dict[str, Any]:
        """Settings beyond `encode` that a cached encoding depends on, by params name (index.json records them)."""
        return {}

    @abstractmethod
    def load_encoders(self, path: Path, device: Any, dtype: Any) -> FrozenEncoders:
        """The VAE, tokenizers and text encoders, frozen, in eval mode, on `device` in `dtype`."""

    @abstractmethod
    def load_denoiser(self, path: Path) -> Any:
        """The denoiser (UNet or transformer) in fp32, ready to train."""

    def denoiser_from_config(self, config: dict[str, Any], on_gpu: bool) -> Any:
        """A denoiser of `config` (its config.json) with random weights, held as load_denoiser holds it for a run on
        a GPU or not, built on the current default device (meta: shapes only, for memory planning)."""
        import diffusers

        return getattr(diffusers, config["_class_name"]).from_config(config)

    @abstractmethod
    def example_inputs(self, config: dict[str, Any], latent_shape: tuple[int, ...]) -> tuple[Any, Any, Conditioning]:
        """Random noisy latents of `latent_shape` (batch, C, h, w), one timestep per sample and the conditioning
        that training feeds the denoiser of `config`, in the shapes the encode stage caches (memory planning)."""

    @abstractmethod
    def load_noise_process(self, path: Path) -> NoiseProcess:
        """The training noise process of the folder's scheduler."""

    @abstractmethod
    def encode_text(self, encoders: FrozenEncoders, texts: list[str]) -> Conditioning:
        """Captions into the denoiser's conditioning, without gradients."""

    @abstractmethod
    def count_truncated(self, encoders: FrozenEncoders, texts: list[str]) -> int:
        """How many texts are longer than the text encoders read."""

    @abstractmethod
    def to_latents(self, vae_config: Any, sample: Any) -> Any:
        """A VAE latent sample as the denoiser sees it (scaled, and shifted where the family shifts)."""

    @abstractmethod
    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, conditioning: Conditioning) -> Any:
        """The denoiser's output on a batch."""

    @abstractmethod
    def sample(self, denoiser: Any, noise: NoiseProcess, conditioning: Conditioning, latent_shape: tuple[int, ...],
               steps: int, guidance_scale: float, seed: int) -> Any:
        """Latents of one image, conditioning row 0 unconditional and row 1 the prompt, from noise seeded with
        `seed` on the CPU (the same image on every device), drawing nothing from the global RNG."""

    def latent_shape(self, vae: Any, denoiser: Any, resolution: int) -> tuple[int, ...]:
        """The latent shape (1, C, h, w) of one image at `resolution`: the VAE halves the size at every block after
        the first."""
        size = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        return 1, denoiser.config.in_channels, size, size

    @abstractmethod
    def save_lora(self, layers: dict[str, Any], folder: Path, weight_name: str, metadata: dict[str, Any]) -> None:
        """Write an adapter's layers (peft's state dict) the way this family's pipeline loads them."""

    def fused(self, denoiser: Any, path: Path, fuse: Any) -> Any:
        """A plain denoiser with the LoRA adapter of `denoiser` fused in, for the fine-tuned pipeline folder: `fuse`
        (train.lora.fused_copy) of it; a family whose base was quantised fuses into the pipeline folder `path`'s
        unquantised weights instead (flux.py)."""
        return fuse(denoiser)
