"""The model-family seam: a pipeline folder names its family, another family's folder is refused in one line, and the
records that travel between modules are frozen and keep every tensor they carry."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from stylestudy.core.config import UserError
from stylestudy.models import families
from stylestudy.models.families import Conditioning, FrozenEncoders, sd2, sd3
from stylestudy.train import batches




def test_a_pipeline_folder_names_its_family(sd_dir: Path, sd3_dir: Path) -> None:
    assert families.check_pipeline_folder(sd_dir) is sd2.FAMILY
    assert families.family_of_pipeline(families.load_pipeline(sd_dir)) is sd2.FAMILY
    assert families.check_pipeline_folder(sd3_dir) is sd3.FAMILY
    assert type(families.load_pipeline(sd3_dir)).__name__ == "StableDiffusion3Pipeline"


def test_another_family_s_folder_is_refused_in_one_line(sd_dir: Path, sd3_dir: Path) -> None:
    for folder, expected, found in ((sd_dir, sd3.FAMILY, "StableDiffusionPipeline"),
                                    (sd3_dir, sd2.FAMILY, "StableDiffusion3Pipeline")):
        with pytest.raises(UserError) as refused:
            families.check_pipeline_folder(folder, expected)
        message = str(refused.value)
        assert "\n" not in message and found in message and f"model.family is {expected.name}" in message, message


def test_an_unknown_pipeline_class_is_refused_in_one_line(sd_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(sd_dir, other)
    index = other / "model_index.json"
    index.write_text(json.dumps(json.loads(index.read_text()) | {"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError) as refused:
        families.check_pipeline_folder(other)
    message = str(refused.value)
    assert "\n" not in message and "'KandinskyPipeline'" in message and "'StableDiffusion3Pipeline'" in message
    assert "'FluxPipeline'" in message


def test_conditioning_rows_repeat_and_storage_keep_the_pooled_embeddings() -> None:
    sequence, pooled = torch.arange(24.0).view(3, 4, 2), torch.arange(6.0).view(3, 2)
    both = Conditioning(sequence, pooled)
    picked = both.rows(torch.tensor([2, 0]))
    assert torch.equal(picked.sequence, sequence[[2, 0]]) and torch.equal(picked.pooled, pooled[[2, 0]])
    twice = both.repeat(2)
    assert torch.equal(twice.sequence[3:], sequence) and torch.equal(twice.pooled[3:], pooled)
    stored = Conditioning.from_tensors(both.tensors())
    assert torch.equal(stored.sequence, sequence) and torch.equal(stored.pooled, pooled)
    assert set(Conditioning(sequence).tensors()) == {"text"}  # SD2's files stay as they were
    joined = Conditioning.cat([both.rows(slice(0, 1)), both.rows(slice(1, 3))])
    assert torch.equal(joined.sequence, sequence) and torch.equal(joined.pooled, pooled)


def test_records_are_frozen(sd_dir: Path) -> None:
    encoders = sd2.FAMILY.load_encoders(sd_dir, torch.device("cpu"), torch.float32)
    batch = batches.PixelBatch(torch.zeros(1, 3, 8, 8), ["a"], [0])
    for record, name in ((encoders, "vae"), (batch, "pixels"), (Conditioning(torch.zeros(1)), "pooled")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, None)
    assert isinstance(encoders, FrozenEncoders) and not encoders.vae.training
    assert not any(p.requires_grad for p in encoders.vae.parameters())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_sd2_noise_process_is_ddpm(kind: str) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind)
    noise_process = sd2.DDPMNoise(scheduler)
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noise_process.noised(clean, noise, t), a.sqrt() * clean + (1 - a).sqrt() * noise)
    expected = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * clean
    torch.testing.assert_close(noise_process.target(clean, noise, t), expected)
    assert noise_process.loss_weights(t, 0.0) is None
    assert noise_process.spread_timesteps(5).tolist() == [0, 250, 500, 749, 999]
