"""stylestudy/train/losses.py, the SD2 family's noise process and caption dropout on tiny random models: each option
against its formula, the defaults against the loss as it was before them (bit for bit), and the CLIP loss's gradient
against autograd of 1 - cos done by hand."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stylestudy.data import dataset, latents, sketches
from stylestudy.models import builders, loading
from stylestudy.models.families import FrozenEncoders, sd2
from stylestudy.train import batches, checkpoints, losses
from tests.conftest import composed

STYLE = "A black and white sketch of"
SEED = 5
N_ITEMS = 1000  # items in the caption dropout test


def make_inputs(root: Path) -> tuple[Path, Path, Path, list[dict], dict]:
    """A tiny pipeline, a tiny guide CLIP (not the scoring CLIP's seed), 8 synthetic sketches, smoke finetune params
    with the smoke encode params beside them (under "encode")."""
    builders.save_random_sd(root / "sd", 0, "tiny")
    builders.save_random_clip(root / "guide", 11, "tiny")
    sketches.make_synthetic_sketches(root / "raw", 8, 32, 0)
    params = composed("profile=smoke")
    return root / "sd", root / "guide", root / "raw", dataset.read_metadata(root / "raw"), \
        params["finetune"] | {"encode": params["encode"]}


def settings_of(p: dict, **changes) -> latents.EncodeSettings:
    return latents.EncodeSettings(**(p["encode"] | changes))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[dict], dict]:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@dataclass(frozen=True)
class Models:
    """What finetune builds, on the CPU in fp32: the frozen encoders, the trainee, the guide."""

    encoders: FrozenEncoders
    trainee: losses.Trainee
    guide: losses.Guide

    @property
    def unet(self):
        return self.trainee.denoiser

    @property
    def scheduler(self):
        return self.trainee.noise.scheduler


def build_models(inputs: tuple, prediction_type: str = "epsilon") -> Models:
    from diffusers import DDPMScheduler

    sd_dir, guide_dir = inputs[0], inputs[1]
    encoders = sd2.FAMILY.load_encoders(sd_dir, torch.device("cpu"), torch.float32)
    scheduler = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler", prediction_type=prediction_type)
    trainee = losses.Trainee(sd2.FAMILY, sd2.FAMILY.load_denoiser(sd_dir).train(), sd2.DDPMNoise(scheduler))
    guide = losses.load_guide(guide_dir, "cpu", encoders.vae, sd2.FAMILY, STYLE)
    return Models(encoders, trainee, guide)


def first_batch(inputs: tuple, models: Models, p: dict, epoch: int = 0, n: int = 4, **encoding):
    """The first n items of `epoch`, drawn as checkpoints.SeededItems draws them, collated, and the TrainingData."""
    data = batches.training_data(inputs[2], inputs[3], models.encoders, settings_of(p, **encoding),
                                 p["caption_dropout"])
    items = checkpoints.SeededItems(batches.Numbered(data.items), 0)
    items.set_epoch(epoch)
    return data.collate([items[i] for i in range(n)]), data


def old_forward(batch, data: batches.TrainingData, models: Models) -> dict:
    """The loss as it was before issue 10 (latents.diffusion_loss), statement for statement, with its intermediates."""
    scheduler = models.scheduler
    inputs = data.to_inputs(batch)
    clean, text = inputs.latents, inputs.conditioning.sequence
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, timesteps)
    prediction = models.unet(noisy, timesteps, text, return_dict=False)[0]
    return {"loss": F.mse_loss(prediction.float(), target.float()), "timesteps": timesteps, "noisy": noisy,
            "prediction": prediction, "target": target}


def new_loss(batch, data: batches.TrainingData, models: Models, p: dict, step: int = 0, guide=None) -> dict:
    return losses.training_loss(data.to_inputs(batch), models.trainee, p, step, guide)


@pytest.mark.parametrize("cache", [True, False])
def test_defaults_give_the_old_loss_bit_for_bit(inputs: tuple, cache: bool) -> None:
    p = inputs[4]
    assert (p["snr_gamma"], p["noise_offset"], p["caption_dropout"], p["clip_loss"]["weight"]) == (0, 0, 0, 0)
    models = build_models(inputs)
    batch, data = first_batch(inputs, models, p, cache_latents=cache)
    assert isinstance(batch, batches.CachedBatch if cache else batches.PixelBatch)
    torch.manual_seed(SEED)
    old = old_forward(batch, data, models)["loss"]
    after_old = torch.get_rng_state()
    torch.manual_seed(SEED)
    new = new_loss(batch, data, models, p)
    assert torch.equal(new["loss"], old) and torch.equal(new["loss_mse"], old)
    assert new["loss_clip"].item() == 0.0
    assert torch.equal(torch.get_rng_state(), after_old)  # the same draws: the next batch sees the same RNG


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(kind: str) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind)
    timesteps = torch.tensor([0, 50, 300, 999])
    a = scheduler.alphas_cumprod.double()[timesteps]
    snr = a / (1 - a)
    assert snr[0] > 5 > snr[-1]  # both sides of gamma
    expected = snr.clamp(max=5) / (snr if kind == "epsilon" else snr + 1)
    got = sd2.DDPMNoise(scheduler).loss_weights(timesteps, 5.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    if kind == "epsilon":
        assert got[-1].item() == pytest.approx(1.0) and got[0].item() == pytest.approx(5 / snr[0].item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_loss_is_the_weighted_mean_of_per_sample_mse(inputs: tuple, kind: str) -> None:
    models = build_models(inputs, kind)
    batch, data = first_batch(inputs, models, inputs[4])
    torch.manual_seed(SEED)
    old = old_forward(batch, data, models)
    a = models.scheduler.alphas_cumprod.double()[old["timesteps"]]
    snr = a / (1 - a)
    gamma = float(snr.median())  # samples on both sides of gamma, whatever timesteps were drawn
    weights = snr.clamp(max=gamma) / (snr if kind == "epsilon" else snr + 1)
    per_sample = ((old["prediction"].double() - old["target"].double()) ** 2).mean(dim=(1, 2, 3))
    p = inputs[4] | {"snr_gamma": gamma}
    torch.manual_seed(SEED)
    got = new_loss(batch, data, models, p)["loss"]
    assert got.item() == pytest.approx((weights * per_sample).mean().item(), rel=1e-5)
    assert got.item() != pytest.approx(old["loss"].item(), rel=1e-3)


def test_noise_offset_adds_one_draw_per_sample_and_channel(inputs: tuple) -> None:
    noise_process = build_models(inputs).trainee.noise
    clean = torch.randn(3, 4, 8, 8)
    torch.manual_seed(SEED)
    noise, timesteps = noise_process.draw(clean, 0.1)
    torch.manual_seed(SEED)
    eps, offset = torch.randn_like(clean), torch.randn(3, 4, 1, 1)
    assert torch.equal(noise, eps + 0.1 * offset)
    assert torch.equal(timesteps, torch.randint(0, 1000, (3,)))
    torch.manual_seed(SEED)
    noise, timesteps = noise_process.draw(clean, 0.0)  # off: no extra draw, today's sequence
    torch.manual_seed(SEED)
    assert torch.equal(noise, torch.randn_like(clean)) and torch.equal(timesteps, torch.randint(0, 1000, (3,)))


class Flipped:
    """Items that draw a flip from the RNG, as the transforms and CachedItems do."""

    def __len__(self) -> int:
        return N_ITEMS

    def __getitem__(self, index: int) -> dict:
        return {"flip": bool(torch.rand(1) < 0.5), "text": f"caption {index}"}


def dropped(dataset: checkpoints.SeededItems, order: range) -> dict[int, tuple[bool, bool]]:
    """index -> (caption dropped, flipped)."""
    items = {i: dataset[i] for i in order}
    return {i: (item["text"] == "", item["flip"]) for i, item in items.items()}


def test_caption_dropout_rate_and_determinism() -> None:
    dataset = checkpoints.SeededItems(batches.CaptionDropout(Flipped(), 0.25, "text", ""), 0)
    first = dropped(dataset, range(N_ITEMS))
    share = sum(drop for drop, _ in first.values()) / N_ITEMS
    assert 0.2 < share < 0.3  # 3.6 standard deviations of a binomial share either side
    again = checkpoints.SeededItems(batches.CaptionDropout(Flipped(), 0.25, "text", ""), 0)
    assert dropped(again, range(N_ITEMS - 1, -1, -1)) == first  # per (seed, epoch, index), whatever came before
    plain = checkpoints.SeededItems(Flipped(), 0)
    assert [plain[i]["flip"] for i in range(N_ITEMS)] == [flip for _, flip in first.values()]  # flips drawn first
    dataset.set_epoch(1)
    assert [drop for drop, _ in dropped(dataset, range(N_ITEMS)).values()] != [drop for drop, _ in first.values()]


@pytest.mark.parametrize("cache", [True, False])
def test_dropped_captions_become_the_empty_caption(inputs: tuple, cache: bool) -> None:
    p = inputs[4]
    models = build_models(inputs)
    empty = models.encoders.encode_text([""]).sequence[0]
    kept, _ = first_batch(inputs, models, p, n=8, cache_latents=cache)
    batch, data = first_batch(inputs, models, p | {"caption_dropout": 0.5}, n=8, cache_latents=cache)
    gone = [i for i, caption in enumerate(batch.captions) if caption == ""]
    assert 0 < len(gone) < 8
    assert [c for i, c in enumerate(batch.captions) if i not in gone] == \
        [c for i, c in enumerate(kept.captions) if i not in gone]
    if cache:
        assert torch.equal(batch.latent_mean, kept.latent_mean)  # the same flips
        for i in gone:
            torch.testing.assert_close(batch.conditioning.sequence[i], empty)
    else:
        assert torch.equal(batch.pixels, kept.pixels)
    conditioning = data.to_inputs(batch).conditioning.sequence  # what the loss sees, cached or encoded now
    for i in gone:
        torch.testing.assert_close(conditioning[i], empty)


def test_cached_data_keeps_no_encoder_and_encoding_every_step_keeps_them(inputs: tuple) -> None:
    models = build_models(inputs)
    cached = first_batch(inputs, models, inputs[4], cache_latents=True)[1]
    assert isinstance(cached.to_inputs, batches.FromCache)
    assert not any(isinstance(v, FrozenEncoders) for v in vars(cached.to_inputs).values())
    every_step = first_batch(inputs, models, inputs[4], cache_latents=False)[1]
    assert every_step.to_inputs.encoders is models.encoders


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_x0_is_the_schedulers_pred_original_sample(kind: str) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind,
                              clip_sample=False)
    generator = torch.Generator().manual_seed(SEED)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for t in (0, 10, 250, 999):
        expected = scheduler.step(output, t, sample, generator=generator).pred_original_sample
        got = sd2.DDPMNoise(scheduler).predicted_x0(sample, output, torch.tensor([t, t]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def reference_clip_loss(old: dict, applied: torch.Tensor, captions: list[str], models: Models) -> torch.Tensor:
    """1 - cos written out from the formulas, not from stylestudy/train/losses.py (epsilon prediction)."""
    import open_clip

    a = models.scheduler.alphas_cumprod[old["timesteps"][applied]].view(-1, 1, 1, 1)
    x0 = (old["noisy"][applied] - (1 - a).sqrt() * old["prediction"][applied]) / a.sqrt()
    vae = models.encoders.vae
    image = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    image = F.interpolate(image, size=(32, 32), mode="bicubic", antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    model, tokenizer = models.guide.model, models.guide.tokenizer
    image_features = model.encode_image((image - mean) / std)
    text_features = model.encode_text(tokenizer([f"{STYLE} {captions[i]}" for i in applied.tolist()]))
    cos = (image_features * text_features).sum(-1) / (image_features.norm(dim=-1) * text_features.norm(dim=-1))
    return (1 - cos).mean()


def unet_grads(models: Models, loss: torch.Tensor) -> list[torch.Tensor]:
    unet = models.unet
    grads = torch.autograd.grad(loss, list(unet.parameters()), allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(unet.parameters(), grads)]


def test_clip_loss_gradient_is_that_of_weight_times_one_minus_cos(inputs: tuple) -> None:
    weight = 0.5
    models = build_models(inputs)
    base = inputs[4]
    batch, data = first_batch(inputs, models, base)
    torch.manual_seed(SEED)
    old = old_forward(batch, data, models)
    cut = int(old["timesteps"].sort().values[2])
    applied = torch.nonzero(old["timesteps"] < cut).flatten()
    assert 0 < len(applied) < 4  # some samples in, some out
    p = base | {"clip_loss": {"weight": weight, "max_timestep": cut, "every": 3}}
    torch.manual_seed(SEED)
    guided = new_loss(batch, data, models, p, 6, models.guide)
    with_clip = unet_grads(models, guided["loss"])
    torch.manual_seed(SEED)
    without = unet_grads(models, new_loss(batch, data, models, base, 6)["loss"])
    reference = reference_clip_loss(old, applied, batch.captions, models)
    expected = unet_grads(models, weight * reference)
    assert guided["loss_clip"].item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(guided["loss"], guided["loss_mse"] + weight * guided["loss_clip"])
    assert max(float(e.abs().max()) for e in expected) > 1e-4  # the CLIP term moves the UNet
    for w, wo, e in zip(with_clip, without, expected):
        torch.testing.assert_close(w - wo, e, rtol=1e-3, atol=1e-6)


def test_clip_loss_costs_nothing_where_it_does_not_apply(inputs: tuple) -> None:
    base = inputs[4]
    models = build_models(inputs)
    batch, data = first_batch(inputs, models, base)
    torch.manual_seed(SEED)
    study = new_loss(batch, data, models, base)["loss"]
    for settings, step in (({"weight": 1.0, "max_timestep": 1000, "every": 2}, 3),  # not an every-th step
                           ({"weight": 1.0, "max_timestep": 1, "every": 1}, 0)):  # no sample with t < 1
        torch.manual_seed(SEED)
        out = new_loss(batch, data, models, base | {"clip_loss": settings}, step, guide=None)  # a guide call fails
        assert torch.equal(out["loss"], study) and out["loss_clip"].item() == 0.0


def sample_image(kind: str):
    """A 64 px RGB image: smooth ramps, or ramps with a hard-edged disc cut out (like a sketch's lines)."""
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    disc = ((x - 0.4) ** 2 + (y - 0.6) ** 2 < 0.08).float() if kind == "edges" else torch.zeros_like(x)
    rgb = torch.stack([x, y * (1 - disc), 0.5 * x * y + 0.25])
    return Image.fromarray((rgb * 255).round().byte().permute(1, 2, 0).contiguous().numpy())


# PIL resizes 8-bit images in fixed point, rounding to 8 bits after each pass: within one step, 1 / 255 / std (0.26)
# = 0.015, on smooth images. At a hard edge its first pass clips the bicubic overshoot before the second pass
# smooths it, which float resizing cannot do: a few pixels along the edge differ by a few steps.
@pytest.mark.parametrize(("kind", "max_error"), [("smooth", 0.016), ("edges", 0.08)])
def test_guide_pixels_match_open_clip_preprocess(inputs: tuple, kind: str, max_error: float) -> None:
    from torchvision.transforms.functional import to_tensor

    guide_dir = inputs[1]
    _, preprocess, _ = loading.load_clip(guide_dir)
    image = sample_image(kind)
    expected = preprocess(image).unsqueeze(0)
    guide = losses.load_guide(guide_dir, "cpu", None, sd2.FAMILY, STYLE)
    got = losses.guide_pixels(to_tensor(image).unsqueeze(0) * 2 - 1, guide)
    assert got.shape == expected.shape == (1, 3, 32, 32)
    error = (got - expected).abs()
    assert float(error.max()) < max_error and float(error.mean()) < 0.003
