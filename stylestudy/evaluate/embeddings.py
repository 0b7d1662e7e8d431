"""CLIP embeddings shared by the evaluation stages: images and texts in batches, which CLIP made them, and the file of
real-sketch embeddings that `embed_real` writes once per split and `clip_eval` compares generated images to.

Embeddings are L2-normalised float32 rows (numpy). torch and open_clip are imported inside the functions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from tqdm import tqdm

from stylestudy.core.config import UserError, require_path
from stylestudy.core.outputs import MANIFEST, write_json

if TYPE_CHECKING:
    from PIL import Image

EMBEDDINGS = "embeddings.safetensors"  # n x d tensors, the rows in the order of files.csv:
EMBEDDINGS_KEY, CSD_KEY = "embeddings", "csd"  # the scoring CLIP's, the CSD style embedder's
INFO = "info.json"  # which CLIP and CSD made them, how many, how many images were skipped


def describe_clip(clip_dir: Path) -> dict[str, Any]:
    """Which CLIP a folder holds, in words a report can print, and the hash of its weights to compare by."""
    manifest = json.loads(require_path(clip_dir / MANIFEST, "run `dvc repro fetch@clip` first").read_text())
    config = json.loads((clip_dir / "open_clip_config.json").read_text())["model_cfg"]
    vision = config["vision_cfg"]
    if manifest["source"] == "hub":
        name = f"{manifest['repo_id']}@{manifest['revision'][:12]}"
    elif manifest["source"] == "local":
        name = f"local folder {manifest['path']}"
    else:
        name = f"{manifest['source']} (random weights, seed {manifest['seed']})"
    weights = next(f for f in manifest["files"] if f.endswith(".safetensors"))
    return {"name": name, "source": manifest["source"], "embed_dim": config["embed_dim"],
            "vision": f"width {vision['width']}, {vision['layers']} layers, patch {vision.get('patch_size')}, "
                      f"{vision['image_size']} px",
            "weights_sha256": manifest["files"][weights]}


def describe_csd(csd_dir: Path) -> dict[str, Any]:
    """Which CSD a folder holds, in words a report can print, and the hash of its weights to compare by."""
    manifest = json.loads(require_path(csd_dir / MANIFEST, "run `dvc repro fetch@csd` first").read_text())
    origin = manifest.get("repo_id") if manifest["source"] == "hub" else manifest["source"]
    return {"name": f"CSD ({origin})", "source": manifest["source"],
            "weights_sha256": manifest["files"]["model.safetensors"]}


def batches(items: list, batch_size: int, what: str | None) -> Any:
    """Consecutive slices of `items`, with a progress bar named `what` (None: no bar)."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return tqdm(chunks, desc=what, unit="batch") if what else chunks


def pixel_weight(model: Any) -> Any:
    """The weight of the first layer the pixels meet (the image tower's first convolution or linear patch embedding).

    open_clip's `precision="fp16"` (half=True) converts only the convolutions, linear and attention layers: the
    embeddings and layer norms stay fp32, so the model's first parameter says nothing about what the pixels must be.
    """
    import torch

    layers = (torch.nn.Conv2d, torch.nn.Linear)
    return next(m.weight for m in model.visual.modules() if isinstance(m, layers))


def embed_images(model: Any, preprocess: Callable, images: list[Path | Image.Image], batch_size: int,
                 progress: str | None = "clip images") -> np.ndarray:
    """Normalised image embeddings (n x d), batched on the device and in the dtype of the image tower's first layer,
    normalised in fp32."""
    import torch
    from PIL import Image

    weight = pixel_weight(model)
    rows = []
    with torch.no_grad():
        for batch in batches(images, batch_size, progress):
            opened = [Image.open(x) if isinstance(x, Path) else x for x in batch]
            pixels = torch.stack([preprocess(image.convert("RGB")) for image in opened]).to(weight.device, weight.dtype)
            # fp16 keeps about 3 significant digits: normalise in fp32.
            rows.append(torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1).cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def embed_texts(model: Any, tokenizer: Callable, texts: list[str], batch_size: int) -> np.ndarray:
    """Normalised text embeddings (n x d), batched on the model's device."""
    import torch

    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for batch in batches(texts, batch_size, "clip texts"):
            features = model.encode_text(tokenizer(batch).to(device)).float()
            rows.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def save_real(folder: Path, embeddings: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Write the real-sketch embeddings (by embedder: EMBEDDINGS_KEY, CSD_KEY) and what made them into `folder`
    (which the caller creates)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in embeddings.items()}, str(folder / EMBEDDINGS))
    write_json(folder / INFO, info)


def load_real(folder: Path, made_by: dict[str, Any], key: str = EMBEDDINGS_KEY) -> np.ndarray:
    """The real-sketch embeddings of one embedder (n x d; n may be 0): the scoring CLIP's, or with key CSD_KEY the
    style embedder's; refused with one line when another model made them."""
    from safetensors.numpy import load_file

    info = json.loads(require_path(folder / INFO, "run `dvc repro embed_real` first").read_text())
    recorded = info["clip" if key == EMBEDDINGS_KEY else key]
    if recorded["weights_sha256"] != made_by["weights_sha256"]:
        model = "CLIP" if key == EMBEDDINGS_KEY else key.upper()
        raise UserError(f"{folder}: embedded with another {model} ({recorded['name']}, not {made_by['name']}); "
                        "run `dvc repro embed_real`")
    return load_file(str(folder / EMBEDDINGS))[key] if info["n_embedded"] else np.zeros((0, 0), np.float32)
