"""The training split encoded once: VAE latent distributions and caption conditioning, stored by the encode stage.

With `encode.cache_latents` the VAE's latent distribution (mean and std) of every training image, for both flips when
`encode.random_flip` is on, and the conditioning of every distinct caption (and the empty one) are computed once: by
the `encode` stage into safetensors files that `finetune` memory-maps (with each image's crop record per flip:
SDXL's time ids), so that every experiment that changes only training settings, a resumed run and every process of a
multi-process run reuse them; or in memory when no such folder is given (benchmarks and tests). Random crops differ every epoch and cannot be cached: without
`encode.center_crop` the fine-tune encodes every step (stylestudy/train/batches.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stylestudy.core.config import UserError, require_path
from stylestudy.core.outputs import MANIFEST, sha256_of, write_json
from stylestudy.data import dataset
from stylestudy.models import loading
from stylestudy.models.families import Conditioning, Family, FrozenEncoders

log = logging.getLogger(__name__)

ENCODE_BATCH = 16  # images or captions encoded at a time while caching
EMPTY_CAPTION = ""  # what a dropped caption becomes: the unconditional input of classifier-free guidance
LATENTS_FILE, TEXT_FILE, INDEX_FILE = "latents.safetensors", "text.safetensors", "index.json"
# The settings an encoding depends on: a cached folder made with other values is refused.
ENCODING_SETTINGS = ("resolution", "center_crop", "random_flip", "mixed_precision")


@dataclass(frozen=True)
class EncodeSettings:
    """params `encode`: how training images and captions become the denoiser's inputs."""

    resolution: int
    center_crop: bool
    random_flip: bool
    cache_latents: bool
    mixed_precision: str  # the frozen encoders' precision on a GPU (fp32 on a CPU)
    dataloader_num_workers: int

    def encoders_dtype(self, device: Any) -> Any:
        """The frozen encoders' dtype on `device`, the same in the encode stage and the fine-tune: mixed_precision as
        it runs on this machine's GPU, fp32 on a CPU."""
        return loading.frozen_dtype(loading.precision_that_runs(self.mixed_precision), device)

    def recorded(self) -> dict[str, Any]:
        """The settings index.json records, by name."""
        return {k: getattr(self, k) for k in ENCODING_SETTINGS}


@dataclass(frozen=True)
class Encoded:
    """A training split encoded once: latent mean and std (flips x images x C x h x w, fp32) in the order of
    file_names, the conditioning of the distinct captions (row i conditions on captions[i], "" included), and each
    image's crop record per flip (flips x images x 6, dataset.TrainTransform.framed; None in encodings made before
    they were stored)."""

    mean: Any
    std: Any
    conditioning: Conditioning
    captions: list[str]
    file_names: list[str]
    crops: Any = None


def cacheable(settings: EncodeSettings) -> bool:
    """Whether the run caches latents; a log line when it was asked to but cannot."""
    if settings.cache_latents and not settings.center_crop:
        log.info("encode.cache_latents needs encode.center_crop (random crops differ every epoch): encoding at every "
                 "step instead")
    return settings.cache_latents and settings.center_crop


def _stack_pixels(items: list[dict]) -> tuple[Any, Any]:
    import torch

    return torch.stack([item["pixel_values"] for item in items]), torch.stack([item["crop"] for item in items])


def encode_images(raw: Path, rows: list[dict], encoders: FrozenEncoders, settings: EncodeSettings,
                  show_progress: bool = True) -> tuple[Any, Any, Any]:
    """Latent mean and std (fp32, CPU) and crop record of every image, unflipped and, with random_flip, flipped."""
    import torch

    images = dataset.CaptionedImages(raw, rows, dataset.train_transforms(settings.resolution, True, False))
    loader = torch.utils.data.DataLoader(images, batch_size=ENCODE_BATCH, collate_fn=_stack_pixels,
                                         num_workers=settings.dataloader_num_workers)
    flips = (False, True) if settings.random_flip else (False,)
    means: list[list] = [[] for _ in flips]
    stds: list[list] = [[] for _ in flips]
    crops: list[list] = [[] for _ in flips]
    for pixels, crop in tqdm(loader, desc="cache latents", unit="batch", disable=not show_progress):
        for k, flip in enumerate(flips):
            dist = encoders.latent_distribution(pixels.flip(-1) if flip else pixels)
            means[k].append(dist.mean.float().cpu())
            stds[k].append(dist.std.float().cpu())
            crops[k].append(torch.stack([dataset.mirrored(c) for c in crop]) if flip else crop)
    return tuple(torch.stack([torch.cat(part) for part in parts]) for parts in (means, stds, crops))


def encode_captions(rows: list[dict], encoders: FrozenEncoders) -> tuple[Conditioning, list[str]]:
    """The conditioning of the distinct captions and the empty one (compute dtype, CPU), and those texts."""
    distinct = list(dict.fromkeys([*(row["text"] for row in rows), EMPTY_CAPTION]))
    parts = [encoders.encode_text(distinct[start:start + ENCODE_BATCH]).to("cpu")
             for start in range(0, len(distinct), ENCODE_BATCH)]
    return Conditioning.cat(parts), distinct


def encode_dataset(raw: Path, rows: list[dict], encoders: FrozenEncoders, settings: EncodeSettings,
                   show_progress: bool = True) -> Encoded:
    """Encode every training image (both flips with random_flip) and every distinct caption once."""
    mean, std, crops = encode_images(raw, rows, encoders, settings, show_progress)
    conditioning, distinct = encode_captions(rows, encoders)
    return Encoded(mean, std, conditioning, distinct, [row["file_name"] for row in rows], crops)


def encoder_digest(sd_dir: Path, family: Family) -> str:
    """sha256 over the hashes of the VAE, text encoder and tokenizer files: fetch's manifest, else hashed now."""
    manifest = sd_dir / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
    else:
        files = {str(f.relative_to(sd_dir)): sha256_of(f) for f in sorted(sd_dir.rglob("*")) if f.is_file()}
    listing = sorted((name, digest) for name, digest in files.items() if name.startswith(family.encoder_folders))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def save_encoded(folder: Path, encoded: Encoded, index: dict) -> None:
    """Write an encoding into `folder` (which the caller creates): two safetensors files and index.json."""
    from safetensors.torch import save_file

    save_file({"mean": encoded.mean.contiguous(), "std": encoded.std.contiguous(), "crop": encoded.crops.contiguous()},
              str(folder / LATENTS_FILE))
    save_file({k: v.contiguous() for k, v in encoded.conditioning.tensors().items()}, str(folder / TEXT_FILE))
    write_json(folder / INDEX_FILE, index | {"cached": True, "captions": encoded.captions,
                                             "file_names": encoded.file_names})


def check_encoded(folder: Path, rows: list[dict], settings: EncodeSettings, sd_dir: Path, family: Family) -> dict:
    """index.json of the encoding in `folder`; one line when it was made from other images, settings or encoders
    (finetune's preflight asks before any process starts)."""
    index = json.loads(require_path(folder / INDEX_FILE, "run `dvc repro encode` first").read_text())
    if not index["cached"]:
        raise UserError(f"{folder}: not an encoding ({index['reason']}); set encode.cache_latents and "
                        "encode.center_crop to true and run `dvc repro encode`, or turn cache_latents off")
    now = settings.recorded()
    differ = [f"encode.{k} {index[k]!r} (now {now[k]!r})" for k in ENCODING_SETTINGS if index[k] != now[k]]
    differ += [f"{k} {index.get(k)!r} (now {v!r})" for k, v in family.encoding_settings().items() if index.get(k) != v]
    if index["encoders"] != encoder_digest(sd_dir, family):
        differ.append(f"the VAE or text encoder of another {sd_dir}")
    if index["file_names"] != [row["file_name"] for row in rows]:
        differ.append("other training images")
    if differ:
        raise UserError(f"{folder} was encoded with {'; '.join(differ)}: run `dvc repro encode`")
    return index


def load_encoded(folder: Path, rows: list[dict], settings: EncodeSettings, sd_dir: Path, family: Family) -> Encoded:
    """The encoding in `folder`, checked, memory-mapped: each process pages in only the items of its shard."""
    from safetensors.torch import load_file

    index = check_encoded(folder, rows, settings, sd_dir, family)
    latents, text = load_file(str(folder / LATENTS_FILE)), load_file(str(folder / TEXT_FILE))
    return Encoded(latents["mean"], latents["std"], Conditioning.from_tensors(text), index["captions"],
                   index["file_names"], latents.get("crop"))


def count_truncated(encoders: FrozenEncoders, captions: list[str]) -> int:
    """How many captions have more tokens than the text encoders read (a log line when any): those are truncated."""
    truncated = encoders.family.count_truncated(encoders, captions)
    if truncated:
        log.info("%d of %d captions are longer than the text encoder reads: they are truncated", truncated,
                 len(captions))
    return truncated
