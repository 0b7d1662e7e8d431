"""The learning check for the FLUX family: a LoRA trained on the NF4 base of the tiny FLUX pipeline generates the image.

As tests/test_learning_sd3.py does for SD3: finetune.run trains the smoke setting's tiny FLUX pipeline (flow matching
on packed latents, the guidance embedding, a LoRA on the 4-bit NF4 base: the study's QLoRA path, on this CPU) on one
synthetic sketch and its caption until it has memorised it; FluxPipeline then generates from the caption (fixed seed,
10 Euler steps, output_type="latent"), and the latent must lie much closer to the sketch's latent than what the
untouched pipeline generates. The adapter, loaded by diffusers' own `load_lora_weights` on the base FluxPipeline (in
full precision), must give the images of the stage's fused folder (the unquantised base with the adapter merged).

Measured (2026-12-07, this 2-core CPU, one thread): base 1.634 -> fine-tuned 0.651 from the sketch's latent (ratio
2.51; the target latent's RMS 1.414: shifted by one standard deviation, see make_memorisable); the loaded adapter and
the fused folder agree within 1e-4. Each break in the FLUX training code, made once locally in a copy: the target's sign
flipped (noise - x0 -> x0 - noise, in the shared FlowMatchNoise) 2.321 -> 2.417 (ratio 0.96, fails); the latents not
shifted before scaling 1.634 -> 1.234 (ratio 1.32, fails; with the tiny VAE's own shift of 0.1159 this break passed
unseen, 0.474 against 0.475 unbroken, hence the larger shift here); the guidance embedding given 1000 x its value
1.506 -> 0.871 (ratio 1.73, fails). Zeroing the pooled CLIP embedding in training passed (ratio 2.74 against 2.60
unbroken, before the shift change): the tiny model barely uses it, and the unit test
tests/test_flux.py::test_sampling_is_the_pipeline_s_denoising is what pins the conditioning to FluxPipeline's. A
random tiny transformer could not be taught by a LoRA at all (ratio 1.28 after 300 steps): the tiny pipeline's
transformer is shaped at build (builders_flux.shape_transformer).

What makes memorising possible in a few hundred CPU steps, as for SD2 and SD3: a near-deterministic VAE posterior and
a scaling factor that gives the shifted latents unit variance (vae_shaping).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import composed
from PIL import Image

from stages.finetune import Folders, run
from stylestudy.data import dataset, latents, sketches
from stylestudy.models import builders_flux, families, vae_shaping

SEED = 0
RESOLUTION = 32
INFERENCE_STEPS = 10
COPIES = 4  # the sketch four times in every batch: four noise draws per step, a steadier gradient
GUIDANCE = 1.0  # what the adapter was trained with (model.guidance)
TRAINING = {"method": "lora", "lora_rank": 16, "lora_alpha": 16, "max_train_steps": 300, "learning_rate": 1e-2,
            "train_batch_size": COPIES, "gradient_accumulation_steps": 1, "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "optimizer": "adamw", "gradient_checkpointing": True, "mixed_precision": "no",
            "use_ema": False, "checkpoint_every": 0, "validate_every": 0}
ENCODING = {"cache_latents": True, "resolution": RESOLUTION, "center_crop": True, "random_flip": False,
            "mixed_precision": "no", "dataloader_num_workers": 0}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def pixels(raw: Path, row: dict) -> torch.Tensor:
    return dataset.train_transforms(RESOLUTION, True, False)(Image.open(raw / row["file_name"]))[None]


def make_memorisable(sd: Path, image: torch.Tensor) -> None:
    """A near-deterministic posterior, a shift of one latent standard deviation past the latents' mean (the tiny
    VAE's 0.1159 is lost in its latents' spread, and so was a training bug that dropped it) and unit-variance shifted
    latents (see the docstring)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd / "vae")
    vae_shaping.make_posterior_deterministic(vae)
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mean
    vae.register_to_config(shift_factor=float(latent.mean() + latent.std()))
    vae_shaping.scale_to_unit_variance(vae, image)
    vae.save_pretrained(sd / "vae", safe_serialization=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("learning-flux")
    sketches.make_synthetic_sketches(root / "raw", 1, RESOLUTION, SEED)
    rows = dataset.read_metadata(root / "raw")
    dataset.write_jsonl(root / "split" / "train.jsonl", rows * COPIES)
    builders_flux.save_random_flux(root / "sd", SEED, "tiny")
    make_memorisable(root / "sd", pixels(root / "raw", rows[0]))
    params = composed("profile=smoke", "model=flux")
    family = families.from_params(params["model"])
    assert family.settings.base_quantization == "nf4" and family.settings.guidance == GUIDANCE
    return SimpleNamespace(root=root, sd=root / "sd", raw=root / "raw", rows=rows, family=family,
                           params=params["finetune"] | TRAINING,
                           encoding=latents.EncodeSettings(**params["encode"] | ENCODING))


@pytest.fixture(scope="module")
def tuned(inputs: SimpleNamespace) -> Path:
    root = inputs.root / "lora"
    folders = Folders(sd=inputs.sd, guide=root / "guide", raw=inputs.raw, split=inputs.root / "split",
                      out=root / "out", live=root / "live", scratch=root / "scratch")
    run(folders, inputs.params, inputs.encoding, SEED, "A black and white sketch of", inputs.family)
    return folders.out


def generated(pipe, inputs: SimpleNamespace) -> torch.Tensor:
    """The (unpacked) latent a pipeline generates from the sketch's caption."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        packed = pipe(inputs.rows[0]["text"], num_inference_steps=INFERENCE_STEPS, guidance_scale=GUIDANCE,
                      height=RESOLUTION, width=RESOLUTION, generator=torch.Generator().manual_seed(SEED),
                      output_type="latent", max_sequence_length=inputs.family.settings.max_sequence_length).images
    return pipe._unpack_latents(packed, RESOLUTION, RESOLUTION, pipe.vae_scale_factor)


def distance(folder: Path, inputs: SimpleNamespace) -> tuple[float, float]:
    """RMS distance between what `folder` generates from the caption and the sketch's latent; the latent's RMS."""
    pipe = families.load_pipeline(folder)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels(inputs.raw, inputs.rows[0])).latent_dist.mean
    # written out, not the family's to_latents: a wrong shift in training must not move the target along with it
    target = (latent - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return float((generated(pipe, inputs) - target).pow(2).mean().sqrt()), float(target.pow(2).mean().sqrt())


def test_a_lora_on_the_nf4_base_memorises_the_image(inputs: SimpleNamespace, tuned: Path) -> None:
    base, size = distance(inputs.sd, inputs)
    after, _ = distance(tuned, inputs)
    print(f"flux qlora: base {base:.3f}, fine-tuned {after:.3f}, ratio {base / after:.2f}, latent RMS {size:.3f}")
    assert base / after > 2.0, f"generated latent {after:.3f} from the image's, the base model's {base:.3f}"
    assert after < size / 2, f"generated latent {after:.3f} from the image's, whose RMS is {size:.3f}"


def test_diffusers_loads_the_adapter_and_gives_the_stage_s_images(inputs: SimpleNamespace, tuned: Path) -> None:
    from diffusers import FluxPipeline

    base = FluxPipeline.from_pretrained(inputs.sd, use_safetensors=True)
    base.load_lora_weights(tuned / "lora", weight_name="pytorch_lora_weights.safetensors")
    fused = families.load_pipeline(tuned)
    torch.testing.assert_close(generated(base, inputs), generated(fused, inputs), atol=1e-4, rtol=1e-4)
