"""The CSD style embedder (stylestudy/models/csd.py): the tiny model's output shape and normalisation, a checkpoint
in the published layout (a pickle with `model_state_dict` under `module.` and an argparse.Namespace) converted and
loaded strictly to the same embeddings, and a pickle holding anything else refused without being unpickled."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from PIL import Image

from stylestudy.core.config import UserError
from stylestudy.models import csd


def published_checkpoint(path: Path, model: torch.nn.Module) -> None:
    """What tomg-group-umd/CSD-ViT-L ships: the DDP-wrapped state dict (backbone, heads) and the training args."""
    state = {f"module.{k.replace('visual.', 'backbone.', 1)}": v for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": state, "args": argparse.Namespace(lr=1e-4, arch="vit_large")}, path)


def test_the_tiny_model_gives_unit_style_embeddings(tmp_path: Path) -> None:
    csd.save_random(tmp_path / "csd", 0, "tiny")
    model, preprocess = csd.load(tmp_path / "csd")
    pixels = torch.stack([preprocess(Image.new("RGB", (48, 40), color)) for color in ("white", "black", "red")])
    out = model.encode_image(pixels)
    assert out.shape == (3, csd.ARCHITECTURES["tiny"]["style_dim"])
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    assert pixels.shape[-2:] == (32, 32)  # resized and centre-cropped to the model's size


def test_a_published_layout_converts_and_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    original = csd.style_embedder(csd.ARCHITECTURES["tiny"]).eval()
    (tmp_path / "snapshot").mkdir()
    published_checkpoint(tmp_path / "snapshot" / "pytorch_model.bin", original)
    csd.convert(tmp_path / "snapshot", tmp_path / "csd")
    converted, _ = csd.load(tmp_path / "csd")
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted.encode_image(pixels), original.encode_image(pixels))
    state = csd.read_checkpoint(tmp_path / "snapshot" / "pytorch_model.bin")
    del state["last_layer_content"]  # a layout with a key missing must not load
    with pytest.raises(RuntimeError, match="last_layer_content"):
        csd.style_embedder(csd.ARCHITECTURES["tiny"]).load_state_dict(
            {k.replace("backbone.", "visual.", 1): v for k, v in state.items()}, strict=True)


class Payload:
    """A class the weights-only unpickler must refuse to build (a real attack would run code in __reduce__)."""


def test_a_pickle_holding_another_class_is_refused(tmp_path: Path) -> None:
    torch.save({"model_state_dict": {}, "args": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="loads safely"):
        csd.convert(tmp_path, tmp_path / "csd")
    assert not (tmp_path / "csd").exists()
