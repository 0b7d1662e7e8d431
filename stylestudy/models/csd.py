"""CSD, a style embedder (Somepalli et al. 2024, "Measuring Style Similarity in Diffusion Models"), written here from
the paper's description and the released checkpoint's layout.

The model: OpenAI CLIP's ViT-L/14 image tower without its final projection (the class token after `ln_post`, 1024
numbers), then a style head, a 1024 x 768 matrix (the paper also trains a content head of the same shape, kept here
so that the checkpoint loads strictly, and unused), the result L2-normalised. Images: 224 px, bicubic resize of the
shorter side, centre crop, CLIP's mean and std. Two images' style similarity is the cosine of their embeddings.

The published weights (`tomg-group-umd/CSD-ViT-L`, CC-BY-4.0) are one pickle, `pytorch_model.bin`, holding the
state dict under `model_state_dict` (keys `module.backbone.*`, `module.last_layer_style`, `module.last_layer_content`)
and the training arguments as an `argparse.Namespace`. `convert` reads it with `torch.load(weights_only=True)` and
that one class allowed, nothing else unpickled, and writes the folder this module loads: `config.json` and
`model.safetensors`. Its authors note that the released weights do not reproduce every number of the paper.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from stylestudy.core.config import UserError
from stylestudy.core.outputs import write_json

CONFIG, WEIGHTS = "config.json", "model.safetensors"
CHECKPOINTS = ("pytorch_model.bin", "*.pth", "*.pt")  # the published pickle, by name or suffix
HEAD_WIDTH = 64  # every OpenAI CLIP ViT's attention heads are 64 wide: the checkpoint's width gives their number
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ARCHITECTURES: dict[str, dict[str, int]] = {
    "full": {"image_size": 224, "patch_size": 14, "width": 1024, "layers": 24, "heads": 16, "style_dim": 768},
    "tiny": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 1, "style_dim": 16},
}


def style_embedder(config: dict[str, int]) -> Any:
    """A randomly initialised CSD model of `config`'s shape (ARCHITECTURES)."""
    import torch
    from open_clip.model import QuickGELU
    from open_clip.transformer import VisionTransformer

    class StyleEmbedder(torch.nn.Module):
        """The CLIP image tower (`visual`, without projection) and the style and content heads."""

        def __init__(self) -> None:
            super().__init__()
            self.visual = VisionTransformer(config["image_size"], config["patch_size"], config["width"],
                                            config["layers"], config["heads"], 4.0, output_dim=config["style_dim"],
                                            act_layer=QuickGELU)
            self.visual.proj = None  # CSD reads the features before CLIP's projection
            scale = config["width"] ** -0.5
            heads = [torch.nn.Parameter(scale * torch.randn(config["width"], config["style_dim"])) for _ in "sc"]
            self.last_layer_style, self.last_layer_content = heads

        def encode_image(self, pixels: Any) -> Any:
            """Unit style embeddings of preprocessed pixels."""
            features = self.visual(pixels)
            return torch.nn.functional.normalize(features @ self.last_layer_style.to(features.dtype), dim=-1)

    return StyleEmbedder()


def preprocess(config: dict[str, int]) -> Callable:
    """PIL image -> the pixels CSD expects: bicubic resize of the shorter side, centre crop, CLIP's mean and std."""
    from torchvision import transforms

    size = config["image_size"]
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def save(out_dir: Path, model: Any, config: dict[str, int]) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS))
    write_json(out_dir / CONFIG, config)


def save_random(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """A random CSD model of `arch` as a folder this module loads; its parameter count."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = style_embedder(ARCHITECTURES[arch])
    save(out_dir, model, ARCHITECTURES[arch])
    return {"csd": sum(p.numel() for p in model.parameters())}


def load(path: Path, device: Any = "cpu", dtype: Any = None) -> tuple[Any, Callable]:
    """The CSD model of a folder (eval mode, no gradients) and its preprocessing."""
    from safetensors.torch import load_file

    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise UserError(f"{path}: not a CSD folder ({CONFIG} and {WEIGHTS}); run `dvc repro fetch@csd`")
    config = json.loads((path / CONFIG).read_text())
    model = style_embedder(config)
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.requires_grad_(False).eval().to(device, dtype=dtype), preprocess(config)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state dict of the published pickle, `module.` prefixes removed; only tensors and an argparse.Namespace
    are unpickled (anything else is refused by torch's weights-only unpickler)."""
    import argparse

    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle.UnpicklingError for a class not allowed, and whatever a torn file gives
            raise UserError(f"{path}: not a CSD checkpoint that loads safely ({str(error).splitlines()[0]}); "
                            "use tomg-group-umd/CSD-ViT-L's pytorch_model.bin") from None
    if "model_state_dict" not in checkpoint:
        raise UserError(f"{path}: no model_state_dict; use tomg-group-umd/CSD-ViT-L's pytorch_model.bin")
    return {k.removeprefix("module."): v for k, v in checkpoint["model_state_dict"].items()}


def convert(src: Path, out_dir: Path) -> None:
    """The published checkpoint in `src` (a file, or a folder holding one) as a CSD folder in `out_dir`: its shape
    read from the weights, loaded strictly, written as safetensors."""
    if (src / CONFIG).is_file():  # a folder this module wrote (a local source): checked by loading it
        model, _ = load(src)
        save(out_dir, model, json.loads((src / CONFIG).read_text()))
        return
    found = [src] if src.is_file() else sorted({f for pattern in CHECKPOINTS for f in src.glob(pattern)})
    if len(found) != 1:
        raise UserError(f"{src}: expected one CSD checkpoint ({', '.join(CHECKPOINTS)}), found {len(found)}")
    state = read_checkpoint(found[0])
    width, style_dim = state["last_layer_style"].shape
    patch = state["backbone.conv1.weight"].shape[-1]
    grid = round((state["backbone.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({k.split(".")[3] for k in state if k.startswith("backbone.transformer.resblocks.")})
    config = {"image_size": grid * patch, "patch_size": patch, "width": width, "layers": layers,
              "heads": width // HEAD_WIDTH, "style_dim": style_dim}
    model = style_embedder(config)
    model.load_state_dict({k.replace("backbone.", "visual.", 1): v for k, v in state.items()}, strict=True)
    save(out_dir, model, config)
