"""The study-shaped random models (fetch source `full`) and the `full` profile, on the meta device (no weights)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages import fetch
from stylestudy.models import builders
from stylestudy.core.config import compose_params

REPO = Path(__file__).resolve().parents[1]
M = 1_000_000


@pytest.fixture(scope="module")
def sd_modules() -> dict:
    with torch.device("meta"):
        return builders.build_sd_modules("full")


@pytest.mark.parametrize("name, millions", [("unet", 865.9), ("vae", 83.7), ("text_encoder", 340.4)])
def test_sd2_base_parameter_counts(sd_modules: dict, name: str, millions: float) -> None:
    assert builders.parameter_counts("full SD", sd_modules)[name] == pytest.approx(millions * M, abs=0.1 * M)
    assert next(sd_modules[name].parameters()).is_meta


def test_sd2_base_components_fit_together(sd_modules: dict) -> None:
    unet, vae, text_encoder = sd_modules["unet"], sd_modules["vae"], sd_modules["text_encoder"]
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size == 1024
    assert unet.config.attention_head_dim == (5, 10, 20, 20) and unet.config.use_linear_projection
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == vae.config.sample_size == 512
    assert text_encoder.config.vocab_size == 49408 and text_encoder.config.num_hidden_layers == 23
    with torch.no_grad():  # a forward pass on meta tensors checks the wiring, not the numbers
        out = unet(torch.empty(2, 4, 64, 64, device="meta"), 10, torch.empty(2, 77, 1024, device="meta")).sample
    assert out.shape == (2, 4, 64, 64)


def test_clip_vit_h_14_parameter_count() -> None:
    import open_clip

    config = builders.clip_config("full")
    with torch.device("meta"):
        model = open_clip.CLIP(**config["model_cfg"])
    assert builders.parameter_counts("full CLIP", {"clip": model})["clip"] == pytest.approx(986.1 * M, abs=0.1 * M)
    assert config["preprocess_cfg"]["size"] == 224 and config["model_cfg"]["embed_dim"] == 1024


def test_blip_base_parameter_count_and_vocabulary() -> None:
    from transformers import BlipForConditionalGeneration

    vocab = builders.blip_vocab("full")
    config = builders.blip_config("full", vocab)
    with torch.device("meta"):
        model = BlipForConditionalGeneration(config)
    # 224.0M distinct parameters; 247.4M when the LM head tied to the word embeddings is counted again.
    assert builders.parameter_counts("full BLIP", {"blip": model})["blip"] == pytest.approx(224.0 * M, abs=0.1 * M)
    assert sum(t.numel() for t in model.state_dict().values()) == pytest.approx(247.4 * M, abs=0.1 * M)
    text = config.text_config
    assert len(vocab) == text.vocab_size == 30524 and config.vision_config.image_size == 384
    assert (vocab["[PAD]"], vocab["[SEP]"], vocab["[DEC]"], vocab["[ENC]"]) == (
        text.pad_token_id, text.sep_token_id, text.bos_token_id, 30523)
    assert vocab["sketch"] < 1000 and sorted(vocab.values()) == list(range(len(vocab)))


def test_full_profile_composes_valid_params(tmp_path: Path) -> None:
    from stylestudy.core.config import load_params, load_shared

    path = tmp_path / "params.yaml"
    compose_params(path, REPO, ["profile=full"])
    assert load_shared(path)["profile"] == "full"  # validates the whole file
    sources = load_params("fetch", path)
    assert {kind: sources[kind]["source"] for kind in ("sd", "clip", "blip")} == dict.fromkeys(("sd", "clip", "blip"),
                                                                                                "full")
    assert sources["data"]["source"] == "synthetic" and sources["data"]["image_size"] == 256
    assert load_params("finetune", path)["epochs"] == 1


def test_fetch_builds_a_full_source_and_records_its_size(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_builder(out: Path, seed: int, arch: str) -> dict[str, int]:
        calls.append(arch)
        out.mkdir(parents=True, exist_ok=True)
        (out / "weights.safetensors").write_bytes(b"w")
        return {"unet": 865_910_724}

    monkeypatch.setitem(fetch.SD_BUILDERS, "sd2", fake_builder)
    p = {"source": "full", "repo_id": "", "revision": "", "path": "", "variant": "default"}
    fetch.run("sd", p, 42, tmp_path / "sd")
    manifest = json.loads((tmp_path / "sd" / "fetch_manifest.json").read_text())
    assert calls == ["full"]
    assert manifest["source"] == "full" and manifest["seed"] == 42 and manifest["parameters"] == {"unet": 865_910_724}
