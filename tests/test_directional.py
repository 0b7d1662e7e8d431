"""DiffusionCLIP's directional CLIP loss (finetune.clip_loss.kind: directional, stylestudy/train/losses.py): its
gradient against the formula and finite differences, the base model's prediction as the reference (LoRA with its
adapter disabled, a full fine-tune's frozen copy), and the loss through training_loss against the formulas written
out on the tiny models."""
from __future__ import annotations

import dataclasses
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

from stylestudy.models.families import Conditioning, sd2
from stylestudy.train import losses, lora
from tests.test_losses import SEED, STYLE, build_models, first_batch, make_inputs, new_loss, old_forward, unet_grads


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return make_inputs(tmp_path_factory.mktemp("inputs"))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def by_hand(tuned: torch.Tensor, reference: torch.Tensor, styled: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    a, d = unit(tuned) - unit(reference), unit(unit(styled) - unit(plain))
    return (1 - (a * d).sum(-1) / a.norm(dim=-1)).mean()


def test_the_gradient_is_the_formulas_and_finite_differences_agree():
    """dL/du for u = tuned, û = u/|u|, a = û - r̂: (I - ûûᵀ)/|u| · -(d/|a| - (a·d) a/|a|³), over a batch of B."""
    g = torch.Generator().manual_seed(0)
    tuned, reference, styled, plain = (torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(4))
    tuned.requires_grad_(True)
    loss = losses.directional_loss(tuned, reference, styled, plain)
    assert loss.item() == pytest.approx(by_hand(tuned, reference, styled, plain).item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, tuned)
    u = tuned.detach()
    u_hat, a, d = unit(u), unit(u) - unit(reference), unit(unit(styled) - unit(plain))
    length = a.norm(dim=-1, keepdim=True)
    d_a = -(d / length - (a * d).sum(-1, keepdim=True) * a / length**3) / len(u)
    projection = torch.eye(8, dtype=torch.float64) - u_hat[:, :, None] * u_hat[:, None, :]
    expected = (projection @ d_a[:, :, None]).squeeze(-1) / u.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: losses.directional_loss(x, reference, styled, plain), (tuned,))


def test_no_move_yet_pushes_along_the_text_direction_and_the_extremes_are_0_and_2():
    """At step 0 the tuned and reference images agree: loss 1, gradient -(I - ûûᵀ) d / (|u| floor B), not 1/0."""
    u = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64, requires_grad=True)
    styled, plain = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    loss = losses.directional_loss(u, u.detach(), styled, plain)
    (grad,) = torch.autograd.grad(loss, u)
    d = unit(unit(styled) - unit(plain)).double()
    u_hat = unit(u.detach())
    expected = -(d - (d * u_hat).sum(-1, keepdim=True) * u_hat) / (5.0 * losses.DIRECTION_FLOOR)
    assert loss.item() == 1.0
    torch.testing.assert_close(grad, expected)
    reference = torch.tensor([[1.0, 0.0, 0.0]])  # the image moved exactly along the text direction, then against it
    assert losses.directional_loss(torch.tensor([[0.0, 0.0, 1.0]]), reference, styled, plain).item() == pytest.approx(0)
    assert losses.directional_loss(reference, torch.tensor([[0.0, 0.0, 1.0]]), styled, plain).item() == \
        pytest.approx(2)


def noisy_batch(unet) -> tuple:
    g = torch.Generator().manual_seed(1)
    noisy, timesteps = torch.randn(2, unet.config.in_channels, 8, 8, generator=g), torch.tensor([10, 500])
    return noisy, timesteps, Conditioning(torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))


def predict(unet, noisy, timesteps, conditioning) -> torch.Tensor:
    with torch.no_grad():
        return sd2.FAMILY.denoise(unet, noisy, timesteps, conditioning)


def test_the_lora_reference_is_the_base_model_with_the_adapter_disabled(inputs):
    base = sd2.FAMILY.load_denoiser(inputs[0])
    unet = sd2.FAMILY.load_denoiser(inputs[0])
    lora.add_lora(unet, 4, 4, sd2.FAMILY.lora_targets)
    with torch.no_grad():  # a trained adapter: B starts at zero, where any reference would match the base
        for name, w in unet.named_parameters():
            if "lora_B" in name:
                w.copy_(0.5 * torch.randn_like(w))
    batch = noisy_batch(base)
    adapted = predict(unet, *batch)
    reference = losses.reference_denoiser(losses.Trainee(sd2.FAMILY, unet, None), "lora", "cpu")
    torch.testing.assert_close(reference(*batch), predict(base, *batch), rtol=1e-5, atol=1e-6)
    assert (adapted - predict(base, *batch)).abs().max() > 1e-3  # the adapter does change the prediction
    assert torch.equal(predict(unet, *batch), adapted)  # and it is enabled again afterwards


def test_the_full_reference_is_a_frozen_copy_whose_memory_is_logged(inputs, caplog):
    unet = sd2.FAMILY.load_denoiser(inputs[0])
    batch = noisy_batch(unet)
    before = predict(unet, *batch)
    with caplog.at_level(logging.INFO, logger="stylestudy.train.losses"):
        reference = losses.reference_denoiser(losses.Trainee(sd2.FAMILY, unet, None), "full", "cpu")
    megabytes = sum(w.numel() * 4 for w in unet.parameters()) / 2**20
    assert f"a frozen copy of the denoiser is the reference ({megabytes:.1f} MB more memory on cpu" in caplog.text
    with torch.no_grad():  # training moves the trainee; the reference stays the base model
        for w in unet.parameters():
            w.add_(0.05)
    assert torch.equal(reference(*batch), before) and not torch.equal(predict(unet, *batch), before)


def features(x0: torch.Tensor, models) -> torch.Tensor:
    """The guide's image embedding of a latent, from the formulas (as tests/test_losses.py's reference_clip_loss)."""
    vae = models.encoders.vae
    image = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    image = F.interpolate(image, size=(32, 32), mode="bicubic", antialias=True)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return models.guide.model.encode_image((image - mean) / std)


def test_through_training_loss_it_is_the_formula_on_base_and_tuned_x0(inputs):
    """A full fine-tune a little way from its base: loss_clip is 1 - cos(ΔI, ΔT) written out from the one-step x0
    of the trainee and of the untouched base UNet, and its gradient reaches the UNet as autograd of that says."""
    models = build_models(inputs)
    base_unet = sd2.FAMILY.load_denoiser(inputs[0])
    reference = losses.reference_denoiser(models.trainee, "full", "cpu")
    with torch.no_grad():
        for w in models.unet.parameters():
            w.add_(0.01 * torch.randn_like(w))
    guide = dataclasses.replace(models.guide, kind="directional", reference=reference)
    p = inputs[4]
    p = p | {"clip_loss": {"weight": 0.5, "kind": "directional", "max_timestep": 1000, "every": 1}}
    batch, data = first_batch(inputs, models, p)
    torch.manual_seed(SEED)
    out = new_loss(batch, data, models, p, 0, guide)
    torch.manual_seed(SEED)
    old = old_forward(batch, data, models)
    a = models.scheduler.alphas_cumprod[old["timesteps"]].view(-1, 1, 1, 1)
    x0 = (old["noisy"] - (1 - a).sqrt() * old["prediction"]) / a.sqrt()
    base_prediction = predict(base_unet, old["noisy"], old["timesteps"], data.to_inputs(batch).conditioning)
    x0_base = (old["noisy"] - (1 - a).sqrt() * base_prediction) / a.sqrt()
    tokens = models.guide.tokenizer
    with torch.no_grad():
        styled = models.guide.model.encode_text(tokens([f"{STYLE} {c}" for c in batch.captions]))
        plain = models.guide.model.encode_text(tokens(list(batch.captions)))
        reference_features = features(x0_base, models)
    expected = by_hand(features(x0, models), reference_features, styled, plain)
    assert out["loss_clip"].item() == pytest.approx(expected.item(), rel=1e-4)
    torch.manual_seed(SEED)
    without = unet_grads(models, new_loss(batch, data, models, inputs[4])["loss"])
    for got, mse, want in zip(unet_grads(models, out["loss"]), without, unet_grads(models, 0.5 * expected)):
        torch.testing.assert_close(got - mse, want, rtol=1e-3, atol=1e-6)
    assert all(w.grad is None for w in models.guide.model.parameters())
