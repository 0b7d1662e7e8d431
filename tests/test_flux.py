"""The FLUX family: packed latents and position ids as FluxPipeline makes them, its conditioning, one denoising
path equal to the pipeline's, the base quantised to NF4 / int8 by our one function (on this CPU, as on a GPU) with
LoRA on top, the adapter fused into the unquantised base, and the settings params refuse for it.

Broken once to see each fail: position ids built over (h, w) instead of (h/2, w/2) (every denoising test: shapes),
timestep passed without / 1000 (the sampling test: 0.21 apart), `is_loaded_in_4bit` not set (peft then wraps the
bnb layer with its plain Linear: the LoRA-type assertion), KEEP emptied (the NF4 output then moves by 13 % of its
norm, not 1 %: the tolerance), bitsandbytes' CPU repacking left on (the layout assertion, after a bf16-autocast
forward; the smoke fine-tune failed at its first step after validation).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import params_refusal, params_with

from stylestudy.core.config import UserError
from stylestudy.models import builders_flux, families, hub, quantization
from stylestudy.models.families import flux
from stylestudy.train import lora

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a horse near a tree", "zebra running"]
# NF4 on the tiny random transformer: the output moved by 1.0 % of its norm (measured); 8-bit by less
QUANTISED_TOLERANCE = {"nf4": 0.03, "int8": 0.03}


def family(**settings) -> flux.Flux:
    return flux.Flux(flux.FluxSettings(max_sequence_length=16, **settings))


def test_packing_and_position_ids_are_the_pipeline_s() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 8)
    tokens = flux.pack(latents)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(latents, 2, 16, 6, 8))
    assert tokens.shape == (2, 3 * 4, 64)
    torch.testing.assert_close(flux.unpack(tokens, 6, 8), latents)
    # the pipeline unpacks with the image's pixel size and the VAE's factor (8 for FLUX.1-dev)
    torch.testing.assert_close(flux.unpack(tokens, 6, 8), FluxPipeline._unpack_latents(tokens, 48, 64, 8))
    ids = flux.position_ids(6, 8, "cpu", torch.float32)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert ids[5].tolist() == [0, 1, 1]  # token 5: row 1, column 1 of the 3 x 4 patch grid


def test_conditioning_is_the_pipeline_s_own(flux_dir: Path) -> None:
    encoders = family().load_encoders(flux_dir, torch.device("cpu"), torch.float32)
    conditioning = encoders.encode_text(TEXTS)
    pipe = families.load_pipeline(flux_dir)
    embeds, pooled, _ = pipe.encode_prompt(TEXTS, None, device="cpu", max_sequence_length=16)
    assert conditioning.sequence.shape == (2, 16, 64) and conditioning.pooled.shape == (2, 32)
    torch.testing.assert_close(conditioning.sequence, embeds)
    torch.testing.assert_close(conditioning.pooled, pooled)
    assert family().count_truncated(encoders, ["a " * 20, "a horse"]) == 1  # 20 T5 tokens and </s> exceed 16


def test_sampling_is_the_pipeline_s_denoising(flux_dir: Path) -> None:
    """The family's denoise (packing, ids, timestep / 1000, guidance embedding) and sampler (FLUX's resolution
    shift) give FluxPipeline's own latents from the same noise."""
    pipe = families.load_pipeline(flux_dir)
    fam = family(base_quantization="none")
    embeds, pooled, _ = pipe.encode_prompt(TEXTS[:1], None, device="cpu", max_sequence_length=16)
    both = families.Conditioning(torch.cat([embeds, embeds]), torch.cat([pooled, pooled]))  # row 0 is not used
    noise = fam.load_noise_process(flux_dir)
    with torch.no_grad():
        ours = fam.sample(pipe.transformer, noise, both, (1, 16, 8, 8), 4, 3.5, seed=3)
        start = flux.pack(torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(3)))
        theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=start, num_inference_steps=4,
                      guidance_scale=3.5, height=32, width=32, output_type="latent").images
    config = pipe.vae.config
    torch.testing.assert_close(fam.from_latents(config, ours), fam.from_latents(config, theirs), atol=1e-5, rtol=1e-5)


def output(fam: flux.Flux, denoiser, conditioning) -> torch.Tensor:
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    return fam.denoise(denoiser, x, torch.tensor([700.0, 150.0]), conditioning)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_quantised_base_trains_a_lora_on_the_cpu(flux_dir: Path, kind: str) -> None:
    import bitsandbytes as bnb

    fam = family(base_quantization=kind)
    conditioning = fam.load_encoders(flux_dir, torch.device("cpu"), torch.float32).encode_text(TEXTS)
    plain = family(base_quantization="none").load_denoiser(flux_dir)
    quantised = fam.load_denoiser(flux_dir)
    layer = bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt
    linears = {name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    replaced = {name for name, m in quantised.named_modules() if isinstance(m, layer)}
    assert replaced == {name for name in linears if not quantization.kept(name, flux.KEEP)}
    assert all(isinstance(quantised.get_submodule(name), torch.nn.Linear) for name in linears - replaced)
    assert {name.split(".")[0] for name in linears - replaced} == set(flux.KEEP)
    with torch.no_grad():
        exact, approximate = output(fam, plain, conditioning), output(fam, quantised, conditioning)
    error = float((approximate - exact).norm() / exact.norm())
    assert 0 < error < QUANTISED_TOLERANCE[kind], error
    quantised.eval()  # as validation images are made in the smoke run
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output(fam, quantised, conditioning)
    # the eval-mode forwards left the weights in the layout training takes (bitsandbytes' CPU repacking is off)
    assert not any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                   for m in quantised.modules() if isinstance(m, layer))

    lora.add_lora(quantised, 4, 4, fam.lora_targets)
    assert type(quantised.transformer_blocks[0].attn.to_q).__module__ == "peft.tuners.lora.bnb"
    quantised.enable_gradient_checkpointing()
    quantised.train()
    for param in lora.trainable_parameters(quantised):  # B starts at 0: move it, so that A gets a gradient too
        torch.nn.init.normal_(param, std=0.01)
    output(fam, quantised, conditioning).pow(2).mean().backward()
    with_grad = [name for name, param in quantised.named_parameters() if param.grad is not None]
    assert with_grad and all("lora_" in name for name in with_grad)
    assert len(with_grad) == len(lora.trainable_parameters(quantised))


def test_the_adapter_is_fused_into_the_unquantised_base(flux_dir: Path) -> None:
    """fused(): the folder's transformer with the adapter merged, what peft gives on the unquantised base."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    fam = family()
    conditioning = fam.load_encoders(flux_dir, torch.device("cpu"), torch.float32).encode_text(TEXTS)
    quantised = fam.load_denoiser(flux_dir)
    lora.add_lora(quantised, 4, 4, fam.lora_targets)
    torch.manual_seed(1)
    for param in lora.trainable_parameters(quantised):
        torch.nn.init.normal_(param, std=0.05)
    fused = fam.fused(quantised, flux_dir, lora.fused_copy)
    assert not any("lora" in name for name, _ in fused.named_parameters())
    reference = family(base_quantization="none").load_denoiser(flux_dir)
    lora.add_lora(reference, 4, 4, fam.lora_targets)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(quantised))
    with torch.no_grad():
        torch.testing.assert_close(output(fam, fused, conditioning), output(fam, reference, conditioning),
                                   atol=1e-4, rtol=1e-4)
        assert not torch.allclose(output(fam, fused, conditioning),
                                  output(fam, family(base_quantization="none").load_denoiser(flux_dir), conditioning))


def copy_as(flux_dir: Path, tmp_path: Path, index: dict | None = None, in_channels: int | None = None) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(flux_dir, folder)
    for name, changes in (("model_index.json", index), ("transformer/config.json", None)):
        path = folder / name
        config = json.loads(path.read_text())
        config |= changes or ({"in_channels": in_channels} if in_channels and "transformer" in name else {})
        path.write_text(json.dumps(config))
    return folder


def test_fill_kontext_and_other_families_folders_are_refused_in_one_line(flux_dir: Path, tmp_path: Path) -> None:
    for cls, words in (("FluxFillPipeline", "FLUX.1 Fill"), ("FluxKontextPipeline", "FLUX.1 Kontext")):
        folder = copy_as(flux_dir, tmp_path / cls, {"_class_name": cls})
        with pytest.raises(UserError, match=words) as refused:
            families.check_pipeline_folder(folder, flux.FAMILY)
        assert "FluxPipeline" in str(refused.value) and "\n" not in str(refused.value)
    folder = copy_as(flux_dir, tmp_path / "fill", in_channels=384)
    with pytest.raises(UserError, match="in_channels 384"):
        families.check_pipeline_folder(folder, flux.FAMILY)
    with pytest.raises(UserError, match=r"\(model family flux\), but params model.family is sd3"):
        families.check_pipeline_folder(flux_dir, families.FAMILIES["sd3"])
    assert families.check_pipeline_folder(flux_dir) is flux.FAMILY


@pytest.mark.parametrize("override, words", [
    ("finetune.method=full", "finetune.method full is refused for model family flux"),
    ("finetune.snr_gamma=5", "no meaning for flow matching (model family flux)"),
    ("model.base_quantization=fp4", "model.base_quantization must be one of nf4, int8, none"),
    ("generate.scheduler=ddim", "not a sampler of model family flux"),
])
def test_settings_flux_cannot_honour_are_refused_in_one_line(tmp_path: Path, override: str, words: str) -> None:
    assert words in params_refusal(tmp_path, "finetune", "model=flux", override)


def test_the_smoke_profile_trains_flux_as_qlora(tmp_path: Path) -> None:
    params = yaml.safe_load(params_with(tmp_path, "model=flux", "profile=smoke").read_text())
    assert params["finetune"]["method"] == "lora" and params["model"]["base_quantization"] == "nf4"
    assert families.from_params(params["model"]).settings == flux.FluxSettings()  # conf/ and the class agree


def test_the_hub_download_takes_flux_s_diffusers_folders_only() -> None:
    from huggingface_hub.utils import filter_repo_objects

    listing = ["model_index.json", "flux1-dev.safetensors", "ae.safetensors", "LICENSE.md", "README.md",
               "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
               *(f"transformer/diffusion_pytorch_model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)),
               "text_encoder/model.safetensors", "text_encoder_2/model-00001-of-00002.safetensors",
               "text_encoder_2/model-00002-of-00002.safetensors", "tokenizer_2/spiece.model",
               "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"]
    taken = set(filter_repo_objects(listing, allow_patterns=hub.FILES["sd"]))
    assert taken == set(listing) - {"flux1-dev.safetensors", "ae.safetensors", "LICENSE.md", "README.md"}


def test_the_full_architecture_is_flux_dev_s_on_the_meta_device() -> None:
    modules = builders_flux.build_flux_modules("full", device="meta")
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert round(counts["transformer"] / 1e9, 2) == 11.90 and round(counts["text_encoder_2"] / 1e9, 2) == 4.76
    assert modules["transformer"].config.guidance_embeds and modules["transformer"].device.type == "meta"
