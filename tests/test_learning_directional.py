"""Learning check of DiffusionCLIP's directional loss (finetune.clip_loss.kind: directional): with that loss alone, on
captions without images, the tuned model's images move along the styled text direction in the guide CLIP's space.

The tiny SD2 UNet of the smoke setting (LoRA, whose reference is the same UNet with its adapter disabled, and a full
fine-tune, whose reference is a frozen copy) is trained on `loss_clip` of losses.training_loss only, never its MSE.
Its noisy inputs are the base model's own samples for the captions, noised at random timesteps: no image of the
dataset is read, as DiffusionCLIP fine-tunes on generated images. Both models then sample every caption from the
same seeds, the guide CLIP embeds the decoded images, and the figure is the mean over captions of
cos(ΔI, ΔT), ΔI = Ê_I(tuned image) - Ê_I(base image), ΔT = Ê_T("<style> caption") - Ê_T(caption): 0 for an image
that moved in a random direction of the guide's space, 1 for one that moved along the text direction exactly.

Measured (100 steps, 8 captions; one thread): LoRA 0.382 (min over captions 0.223), full 0.476 (min 0.363), against
0 ± 0.06 for images that moved in random directions of the tiny guide's 32-wide space. Broken once each locally: the
text direction reversed in directional_loss (plain minus styled) gives -0.398 and -0.474; the LoRA reference left
with its adapter on (the tuned model against itself, so only the floored |ΔI| steers) gives 0.196; each fails.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from stylestudy.models.families import Conditioning, sd2
from stylestudy.train import lora, losses
from stylestudy.train.batches import TrainInputs
from tests.test_losses import STYLE, Models, build_models, make_inputs

SEED = 3
STEPS = 100
SAMPLING_STEPS = 10
FIGURE_AT_LEAST = 0.25  # mean cos(ΔI, ΔT) over the 8 captions (random directions: 0 ± 0.06)
SETTINGS = {"lora": {"learning_rate": 1e-2, "rank": 4}, "full": {"learning_rate": 1e-4}}
LOSS = {"noise_offset": 0.0, "snr_gamma": 0.0,
        "clip_loss": {"weight": 1.0, "kind": "directional", "max_timestep": 1000, "every": 1}}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def captions_of(inputs: tuple) -> list[str]:
    return [row["text"] for row in inputs[3]]


def samples(models: Models, denoiser, captions: list[str]) -> torch.Tensor:
    """Latents x0 of one image per caption (seed SEED + i), the caption's prediction alone (guidance 1)."""
    family, unconditional = sd2.FAMILY, sd2.FAMILY.encode_text(models.encoders, [""])
    shape = family.latent_shape(models.encoders.vae, denoiser, 32)
    with torch.no_grad():
        return torch.cat([family.sample(denoiser, models.trainee.noise,
                                        Conditioning.cat([unconditional, family.encode_text(models.encoders, [c])]),
                                        shape, SAMPLING_STEPS, 1.0, SEED + i) for i, c in enumerate(captions)])


def tune(models: Models, method: str, captions: list[str]) -> None:
    """STEPS optimizer steps of loss_clip alone (directional) on the base model's samples of `captions`, noised."""
    unet, setting = models.unet, SETTINGS[method]
    if method == "lora":
        lora.add_lora(unet, setting["rank"], setting["rank"], sd2.FAMILY.lora_targets)
    parameters = lora.trainable_parameters(unet) if method == "lora" else list(unet.parameters())
    starts = samples(models, unet, captions)  # before any step: the base model's images
    guide = dataclasses.replace(models.guide, kind="directional",
                                reference=losses.reference_denoiser(models.trainee, method, "cpu"))
    conditioning = sd2.FAMILY.encode_text(models.encoders, captions)
    optimizer = torch.optim.AdamW(parameters, lr=setting["learning_rate"])
    torch.manual_seed(SEED)
    for step in range(STEPS):
        out = losses.training_loss(TrainInputs(starts, conditioning, captions), models.trainee, LOSS, step, guide)
        optimizer.zero_grad()
        out["loss_clip"].backward()
        optimizer.step()


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def image_embeddings(models: Models, x0: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return unit(losses.image_features(x0, models.guide))


def text_direction(models: Models, captions: list[str]) -> torch.Tensor:
    guide = models.guide
    with torch.no_grad():
        styled = guide.model.encode_text(guide.tokenizer([f"{STYLE} {c}" for c in captions]))
        plain = guide.model.encode_text(guide.tokenizer(captions))
    return unit(unit(styled) - unit(plain))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_directional_loss_alone_moves_images_along_the_text_direction(inputs: tuple, method: str) -> None:
    models, captions = build_models(inputs), captions_of(inputs)
    base = image_embeddings(models, samples(models, models.unet, captions))
    tune(models, method, captions)
    models.unet.eval()
    tuned = image_embeddings(models, samples(models, models.unet, captions))
    moved = tuned - base
    cosines = (unit(moved) * text_direction(models, captions)).sum(-1)
    print(f"{method}: mean cos(ΔI, ΔT) {cosines.mean():.3f} (min {cosines.min():.3f}), "
          f"|ΔI| {moved.norm(dim=-1).mean():.3f}")
    assert moved.norm(dim=-1).min() > 1e-3  # every caption's image moved
    assert cosines.mean() > FIGURE_AT_LEAST
