"""What the denoiser trains on: items, typed batches, and the step that turns a batch into latents and conditioning.

Two kinds of batch. With a cached encoding (stylestudy/data/latents.py) a `CachedBatch` holds each image's latent
distribution and its caption's conditioning; each step samples latents from the distribution with the global (seeded)
RNG, as `vae.encode(...).latent_dist.sample()` does. Otherwise a `PixelBatch` holds transformed pixels and caption
texts, encoded at every step by the frozen encoders (random crops cannot be cached). Each item's flip is drawn as
torchvision's RandomHorizontalFlip draws it (`torch.rand(1) < 0.5`, seeded per item by checkpoints.SeededItems):
cached and uncached runs train on the same flipped images.

Caption dropout (`finetune.caption_dropout` > 0) replaces an item's caption by the empty one, decided after the flip
with the item's own seeded RNG: a resumed run drops the same captions. Both batch kinds carry each sample's caption
text ("" where dropped) for the CLIP loss, and each sample's crop record (original size, crop top-left, target
size: dataset.TrainTransform.framed), cached per image and flip or computed with the crop, which goes onto the
conditioning (`Conditioning.crops`) for the families that condition on it (SDXL's time ids).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylestudy.data import dataset, latents
from stylestudy.models.families import Conditioning, Family, FrozenEncoders

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainInputs:
    """One batch as the loss takes it: scaled latents x0, their conditioning, and the caption texts."""

    latents: Any
    conditioning: Conditioning
    captions: list[str]


@dataclass(frozen=True)
class CachedBatch:
    """Latent distributions (mean, std), the captions' cached conditioning with the images' crop records, the texts,
    and the items' indices."""

    latent_mean: Any
    latent_std: Any
    conditioning: Conditioning
    captions: list[str]
    index: list[int]

    def to(self, device: Any, non_blocking: bool = False) -> CachedBatch:
        return CachedBatch(self.latent_mean.to(device, non_blocking=non_blocking),
                           self.latent_std.to(device, non_blocking=non_blocking),
                           self.conditioning.to(device, non_blocking=non_blocking), self.captions, self.index)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass(frozen=True)
class PixelBatch:
    """Transformed pixels in [-1, 1], the caption texts, the items' indices, and their crop records (batch x 6)."""

    pixels: Any
    captions: list[str]
    index: list[int]
    crops: Any = None

    def to(self, device: Any, non_blocking: bool = False) -> PixelBatch:
        crops = None if self.crops is None else self.crops.to(device, non_blocking=non_blocking)
        return PixelBatch(self.pixels.to(device, non_blocking=non_blocking), self.captions, self.index, crops)

    def __len__(self) -> int:
        return len(self.captions)


class Numbered:
    """Items as (index, item): the batch then says which items it holds, whatever sampler, shard and worker made it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class CachedItems:
    """Items (latent mean, latent std, crop record, caption row), flipped at random when both flips are cached."""

    def __init__(self, mean: Any, std: Any, captions: list[int], crops: Any = None) -> None:
        self.mean, self.std, self.captions = mean, std, captions  # mean, std: flips x images x C x h x w
        self.crops = crops  # flips x images x 6, or None (an encoding made before crops were stored)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        flip = int(self.mean.shape[0] > 1 and bool(torch.rand(1) < 0.5))
        crop = None if self.crops is None else self.crops[flip, index]
        return {"latent_mean": self.mean[flip, index], "latent_std": self.std[flip, index], "crop": crop,
                "caption": self.captions[index]}


class CaptionDropout:
    """Items of `dataset` whose `key` is replaced by `empty` with probability `rate`, drawn after the item's own draws.

    Inside checkpoints.SeededItems the draw comes from the item's (seed, epoch, index) RNG, after the flip and crop
    that `dataset[index]` drew, so those stay what they were without dropout.
    """

    def __init__(self, dataset: Any, rate: float, key: str, empty: Any) -> None:
        self.dataset, self.rate, self.key, self.empty = dataset, rate, key, empty

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        item = self.dataset[index]
        return item | {self.key: self.empty} if bool(torch.rand(1) < self.rate) else item


class CollateCached:
    """collate_fn for numbered CachedItems: stacked distributions, the conditioning of their captions with their crop
    records, and the texts."""

    def __init__(self, conditioning: Conditioning, distinct: list[str]) -> None:
        self.conditioning, self.distinct = conditioning, distinct  # row i of `conditioning` is distinct[i]

    def __call__(self, pairs: list[tuple[int, dict]]) -> CachedBatch:
        import torch

        items = [item for _, item in pairs]
        rows = [item["caption"] for item in items]
        conditioning = self.conditioning.rows(torch.tensor(rows))
        if items[0]["crop"] is not None:
            conditioning = conditioning.with_crops(torch.stack([item["crop"] for item in items]))
        return CachedBatch(torch.stack([item["latent_mean"] for item in items]),
                           torch.stack([item["latent_std"] for item in items]),
                           conditioning, [self.distinct[row] for row in rows], [index for index, _ in pairs])


def collate_pixels(pairs: list[tuple[int, dict]]) -> PixelBatch:
    """collate_fn for numbered dataset.CaptionedImages: stacked pixels, the caption texts and the crop records."""
    import torch

    items = [item for _, item in pairs]
    return PixelBatch(torch.stack([item["pixel_values"] for item in items]), [item["text"] for item in items],
                      [index for index, _ in pairs], torch.stack([item["crop"] for item in items]))


class FromCache:
    """Batch -> TrainInputs for cached batches: latents sampled from their distribution, the cached conditioning."""

    def __init__(self, family: Family, vae_config: Any, device: Any) -> None:
        self.family, self.vae_config, self.device = family, vae_config, device

    def __call__(self, batch: CachedBatch) -> TrainInputs:
        import torch

        mean, std = batch.latent_mean.to(self.device), batch.latent_std.to(self.device)
        sample = mean + std * torch.randn_like(mean)  # DiagonalGaussianDistribution.sample(), from the cache
        return TrainInputs(self.family.to_latents(self.vae_config, sample), batch.conditioning.to(self.device),
                           batch.captions)


class EncodeEveryStep:
    """Batch -> TrainInputs for pixel batches: the frozen encoders encode each batch (and are kept for it)."""

    def __init__(self, encoders: FrozenEncoders) -> None:
        self.encoders = encoders

    def __call__(self, batch: PixelBatch) -> TrainInputs:
        encoders = self.encoders
        sample = encoders.latent_distribution(batch.pixels).sample()
        scaled = encoders.family.to_latents(encoders.vae.config, sample)
        crops = None if batch.crops is None else batch.crops.to(encoders.device)
        return TrainInputs(scaled, encoders.encode_text(batch.captions).with_crops(crops), batch.captions)


@dataclass(frozen=True)
class TrainingData:
    """The training items, their collate_fn, and what turns each batch into the loss's inputs."""

    items: Any
    collate: Any
    to_inputs: Any  # FromCache or EncodeEveryStep


def cached_data(encoded: latents.Encoded, rows: list[dict], encoders: FrozenEncoders, caption_dropout: float) \
        -> TrainingData:
    """The cached items (with caption dropout if asked) of an encoding; the encoders are not kept."""
    row_of = {text: i for i, text in enumerate(encoded.captions)}
    mib = (encoded.mean.nbytes + encoded.std.nbytes) / 2**20, encoded.conditioning.sequence.nbytes / 2**20
    log.info("cached latents of %d images x %d flips (%.0f MiB) and text embeddings of %d distinct captions "
             "(%.0f MiB)", len(rows), encoded.mean.shape[0], mib[0], len(encoded.captions), mib[1])
    items: Any = CachedItems(encoded.mean, encoded.std, [row_of[row["text"]] for row in rows], encoded.crops)
    if caption_dropout > 0:
        items = CaptionDropout(items, caption_dropout, "caption", row_of[latents.EMPTY_CAPTION])
    to_inputs = FromCache(encoders.family, encoders.vae.config, encoders.device)
    return TrainingData(items, CollateCached(encoded.conditioning, encoded.captions), to_inputs)


def training_data(raw: Path, rows: list[dict], encoders: FrozenEncoders, settings: latents.EncodeSettings,
                  caption_dropout: float, encoded_dir: Path | None = None, sd_dir: Path | None = None,
                  show_progress: bool = True) -> TrainingData:
    """The training data: cached latents (from the encode stage's folder when one is given, else encoded now), or
    images transformed and encoded at every step."""
    if latents.cacheable(settings):
        if encoded_dir is None:
            encoded = latents.encode_dataset(raw, rows, encoders, settings, show_progress)
        else:
            encoded = latents.load_encoded(encoded_dir, rows, settings, sd_dir, encoders.family)
        return cached_data(encoded, rows, encoders, caption_dropout)
    transform = dataset.train_transforms(settings.resolution, settings.center_crop, settings.random_flip)
    items: Any = dataset.CaptionedImages(raw, rows, transform)
    if caption_dropout > 0:
        items = CaptionDropout(items, caption_dropout, "text", latents.EMPTY_CAPTION)
    return TrainingData(items, collate_pixels, EncodeEveryStep(encoders))
