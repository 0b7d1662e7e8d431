"""LoRA (stylestudy/train/lora.py) on the tiny pipeline: only the adapter trains; its saved file and its fused UNet give the same
images; the fused folder is a plain UNet; EMA and accelerate checkpoints work on the adapter's parameters."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stylestudy.models import families
from stylestudy.models.families import sd2
from stylestudy.train import lora

RANK, ALPHA = 4, 8.0  # alpha != rank: an adapter file that lost its alpha would load with the wrong scale
LR, STEPS = 5e-2, 5  # large enough for the LoRA to change the images clearly (base vs fused about 25 dB)



def load_unet(sd_dir: Path):
    return families.load_pipeline(sd_dir).unet


def base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights under their plain names (peft moves them to `.base_layer`), without the adapter."""
    return {name.replace(".base_layer", ""): value.detach().clone()
            for name, value in unet.state_dict().items() if "lora_" not in name}


def lora_weights(unet) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in unet.named_parameters() if "lora_" in name}


def train_steps(unet, optimizer, steps: int, ema=None) -> None:
    """A few AdamW steps of an MSE loss on one fixed batch (the same batch every time)."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 8, 32, generator=generator)
    target = torch.randn(2, 4, 16, 16, generator=generator)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(unet(sample, torch.tensor([10, 500]), text).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(lora.trainable_parameters(unet))


@pytest.fixture(scope="module")
def trained(sd_dir: Path) -> dict:
    """A UNet with a LoRA trained a few steps, and the weights before (base and adapter)."""
    unet = load_unet(sd_dir)
    before = base_weights(unet)
    lora.add_lora(unet, RANK, ALPHA, sd2.FAMILY.lora_targets)
    initial_lora = lora_weights(unet)
    train_steps(unet, torch.optim.AdamW(lora.trainable_parameters(unet), lr=LR), STEPS)
    return {"unet": unet, "base_before": before, "lora_before": initial_lora}


def test_only_the_lora_trains(trained: dict) -> None:
    unet = trained["unet"]
    after = base_weights(unet)
    assert after.keys() == trained["base_before"].keys()
    untouched = [name for name, value in trained["base_before"].items() if torch.equal(value, after[name])]
    assert len(untouched) == len(after), f"base weights changed: {sorted(set(after) - set(untouched))[:5]}"
    lora_now = lora_weights(unet)
    assert lora_now, "no LoRA parameters"
    unchanged = [name for name, value in trained["lora_before"].items() if torch.equal(value, lora_now[name])]
    assert not unchanged, f"LoRA parameters that did not train: {unchanged[:5]}"
    trainable = {name for name, param in unet.named_parameters() if param.requires_grad}
    assert trainable == lora_now.keys()
    n_trainable = sum(p.numel() for p in lora.trainable_parameters(unet))
    n_lora = sum(value.numel() for value in lora_now.values())
    n_base = sum(param.numel() for name, param in unet.named_parameters() if "lora_" not in name)
    assert n_trainable == n_lora
    assert 0 < n_trainable < 0.05 * n_base, (n_trainable, n_base)


def images(pipe) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    return pipe(["a sketch of a cat", "a horse by a tree"], num_inference_steps=3, generator=generators,
                output_type="np").images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def test_saved_adapter_gives_the_fused_unet_images(trained: dict, sd_dir: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = trained["unet"]
    adapter_file = lora.save_adapter(unet, tmp_path / "adapter", sd2.FAMILY)
    assert adapter_file == tmp_path / "adapter" / "pytorch_lora_weights.safetensors" and adapter_file.is_file()
    lora.fused_copy(unet).save_pretrained(tmp_path / "fused", safe_serialization=True)

    with_adapter = families.load_pipeline(sd_dir)
    with_adapter.load_lora_weights(tmp_path / "adapter")
    with_fused = families.load_pipeline(sd_dir)
    with_fused.unet = UNet2DConditionModel.from_pretrained(tmp_path / "fused")
    base, adapted, fused = images(families.load_pipeline(sd_dir)), images(with_adapter), images(with_fused)
    print(f"PSNR adapter vs fused {psnr(adapted, fused):.1f} dB, base vs fused {psnr(base, fused):.1f} dB")
    assert psnr(adapted, fused) >= 40
    assert psnr(base, fused) < 35, "the LoRA did not change the images: the comparison above proves nothing"


def test_fused_folder_is_a_plain_unet(trained: dict, sd_dir: Path, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    unet = trained["unet"]
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    fused = lora.fused_copy(unet)
    assert all(torch.equal(value, unet.state_dict()[name]) for name, value in before.items()), "unet was changed"
    assert hasattr(unet, "peft_config")

    pipeline = tmp_path / "finetuned"
    shutil.copytree(sd_dir, pipeline, ignore=shutil.ignore_patterns("unet"))
    fused.save_pretrained(pipeline / "unet", safe_serialization=True)
    with safe_open(pipeline / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = set(f.keys())
    with safe_open(sd_dir / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert keys == set(f.keys())
    assert not [key for key in keys if "lora" in key or "base_layer" in key]
    config = json.loads((pipeline / "unet" / "config.json").read_text())
    assert not [key for key in config if "lora" in key or "peft" in key]

    loaded = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    assert not hasattr(loaded, "peft_config")
    base = trained["base_before"]
    weights = loaded.state_dict()
    assert weights.keys() == base.keys()
    merged = [name for name in weights if not torch.equal(weights[name], base[name])]
    assert merged and all(name.rsplit(".", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in merged)
    assert families.load_pipeline(pipeline).unet.state_dict().keys() == base.keys()


def test_keep_trainable_in_fp32_under_half_weights(sd_dir: Path) -> None:
    unet = load_unet(sd_dir).to(torch.float16)
    lora.add_lora(unet, RANK, ALPHA, sd2.FAMILY.lora_targets)
    assert {p.dtype for p in lora.trainable_parameters(unet)} == {torch.float16}  # why the function exists
    lora.keep_trainable_in_fp32(unet)
    assert {p.dtype for p in lora.trainable_parameters(unet)} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.float16}
    assert {p.dtype for p in lora.fused_copy(unet).parameters()} == {torch.float32}


def test_ema_on_the_lora_parameters(sd_dir: Path) -> None:
    from diffusers.training_utils import EMAModel

    unet = load_unet(sd_dir)
    lora.add_lora(unet, RANK, ALPHA, sd2.FAMILY.lora_targets)
    params = lora.trainable_parameters(unet)
    ema = EMAModel(params, decay=0.9, foreach=True)
    assert [s.shape for s in ema.shadow_params] == [p.shape for p in params]
    train_steps(unet, torch.optim.AdamW(params, lr=LR), STEPS, ema=ema)
    base, raw = base_weights(unet), [p.detach().clone() for p in params]
    ema.copy_to(params)
    assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow_params))
    assert all(not torch.equal(p, r) for p, r in zip(params, raw)), "copy_to left trained values in place"
    assert all(torch.equal(value, base[name]) for name, value in base_weights(unet).items())


def test_accelerate_checkpoint_resumes_a_lora_unet(sd_dir: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    unet = load_unet(sd_dir)
    lora.add_lora(unet, RANK, ALPHA, sd2.FAMILY.lora_targets)
    optimizer = torch.optim.AdamW(lora.trainable_parameters(unet), lr=LR)
    ema = EMAModel(lora.trainable_parameters(unet), decay=0.9, foreach=True)
    accelerator = Accelerator(mixed_precision="no")
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(ema)
    train_steps(unet, optimizer, 2, ema=ema)
    accelerator.save_state(str(tmp_path / "checkpoint"))
    train_steps(unet, optimizer, 1, ema=ema)
    expected, expected_ema = lora_weights(unet), [s.clone() for s in ema.shadow_params]
    train_steps(unet, optimizer, 2, ema=ema)  # somewhere else, as an interrupted run would be

    accelerator.load_state(str(tmp_path / "checkpoint"))
    train_steps(unet, optimizer, 1, ema=ema)
    resumed = lora_weights(unet)
    assert all(torch.equal(resumed[name], value) for name, value in expected.items())
    assert all(torch.equal(s, e) for s, e in zip(ema.shadow_params, expected_ema))
