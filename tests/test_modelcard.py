"""stylestudy/train/modelcard.py: a Hugging Face model card whose front matter parses, whose body says what was trained under
which licences and how to load it, and whose bytes depend only on the inputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import composed

from stylestudy.train.modelcard import write_model_card

STUDY = composed()
SMOKE = composed("profile=smoke")
COMMIT = "fa386bb446685d8ad8a8f06e732a66ad10be6f47"
HUB_BASE = {"kind": "sd", "source": "hub", "repo_id": "stabilityai/stable-diffusion-2-base", "revision": COMMIT,
            "resolved_commit": COMMIT, "libraries": {"diffusers": "0.42.1"}}
HUB_DATA = {"kind": "data", "source": "hub", "repo_id": "zoheb/sketch-scene", "revision": "main",
            "resolved_commit": "0" * 40}


def study_info(**params) -> dict:
    """finetune's `info` for a run of the study's sources and parameters (with `params` over them)."""
    return {"steps": 2025, "final_loss": 0.1234567, "params": STUDY["finetune"] | params,
            "encode": STUDY["encode"], "seed": 42,
            "n_train_images": 2700, "n_captions_truncated": 3, "device": "cuda", "mixed_precision_ran": "fp16",
            "libraries": {"diffusers": "0.42.1"}, "base_model": HUB_BASE, "dataset": HUB_DATA}


def card(tmp_path: Path, info: dict, lora: bool) -> tuple[dict, str]:
    """The front matter, parsed, and the body of the README.md written for `info`."""
    write_model_card(tmp_path, info, lora)
    _, front, body = (tmp_path / "README.md").read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(front), body


def test_front_matter_of_a_study_run(tmp_path: Path) -> None:
    front, _ = card(tmp_path, study_info(), lora=False)
    assert front == {"base_model": "stabilityai/stable-diffusion-2-base", "license": "openrail++",
                     "datasets": ["zoheb/sketch-scene"], "library_name": "diffusers",
                     "tags": ["stable-diffusion", "text-to-image", "diffusers", "sketch"]}


def test_huggingface_hub_reads_the_card(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    write_model_card(tmp_path, study_info(), lora=False)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.license == "openrail++" and loaded.data.base_model == "stabilityai/stable-diffusion-2-base"


def test_body_names_method_recipe_sources_licences_and_usage(tmp_path: Path) -> None:
    _, body = card(tmp_path, study_info(), lora=False)
    assert "Full fine-tune of every UNet weight" in body
    assert "2025 optimizer steps on 2700 images; final training loss 0.1235" in body
    for row in ("| learning rate | 1e-05, constant schedule", "| optimizer | adamw8bit", "| EMA | decay 0.9999",
                "| resolution | 256 px, center crop, random horizontal flip", "| mixed precision | fp16 |"):
        assert row in body
    assert f"revision `{COMMIT}`" in body and "`zoheb/sketch-scene`" in body
    assert "CC BY-NC-SA 4.0" in body and "non-commercial purposes only" in body
    assert "CreativeML Open RAIL++-M" in body
    assert 'StableDiffusionPipeline.from_pretrained("models/finetuned")' in body
    assert "load_lora_weights" not in body


def test_lora_card_loads_the_adapter_on_the_base_model(tmp_path: Path) -> None:
    front, body = card(tmp_path, study_info(method="lora", lora_rank=8, lora_alpha=16), lora=True)
    assert front["tags"][-1] == "lora"
    assert "LoRA fine-tune of the UNet: adapters of rank 8 and alpha 16" in body
    assert f'from_pretrained("stabilityai/stable-diffusion-2-base", revision="{COMMIT}")' in body
    assert 'load_lora_weights("models/finetuned/lora", weight_name="pytorch_lora_weights.safetensors")' in body


def test_loss_options_appear_when_on(tmp_path: Path) -> None:
    _, body = card(tmp_path, study_info(snr_gamma=5.0, noise_offset=0.05), lora=False)
    assert "| loss | MSE on the base scheduler's prediction target, min-SNR gamma 5, noise offset 0.05 |" in body


def test_smoke_sources_have_no_hub_ids_nor_machine_paths(tmp_path: Path) -> None:
    info = study_info() | {"params": SMOKE["finetune"], "encode": SMOKE["encode"], "mixed_precision_ran": "bf16",
                           "base_model": {"kind": "sd", "source": "tiny", "seed": 42},
                           "dataset": {"kind": "data", "source": "local", "path": str(tmp_path / "my-sketches")}}
    front, body = card(tmp_path, info, lora=False)
    assert "base_model" not in front and "datasets" not in front and front["license"] == "other"
    assert "randomly initialised weights built from the tiny configs" in body and "(seed 42)" in body
    assert "a local dataset folder (`my-sketches`)" in body and str(tmp_path) not in body
    assert "| mixed precision | fp16 (ran as bf16) |" in body
    assert 'from_pretrained("models/pretrained/sd")' not in body  # only the LoRA snippet loads the base folder


@pytest.mark.parametrize("lora", [False, True])
def test_same_inputs_give_the_same_bytes(tmp_path: Path, lora: bool) -> None:
    write_model_card(tmp_path / "a", study_info(), lora)
    write_model_card(tmp_path / "b", study_info(), lora)
    assert (tmp_path / "a/README.md").read_bytes() == (tmp_path / "b/README.md").read_bytes()
