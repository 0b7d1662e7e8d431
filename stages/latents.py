"""What the UNet trains on: VAE latents and text embeddings, encoded at every step or once per dataset.

With `cache_latents` the VAE's latent distribution (mean and std) of every training image, for both flips when
`random_flip` is on, and the text encoder's output for every distinct caption are computed once, before training, and
kept in memory. Each step still samples its latents from the cached distribution with the global (seeded) RNG, as
`vae.encode(...).latent_dist.sample()` does, and each item's flip is drawn as torchvision's RandomHorizontalFlip draws
it (`torch.rand(1) < 0.5`, seeded per item by training.SeededItems): cached and uncached runs train on the same
flipped images. Random crops differ every epoch and cannot be cached: without `center_crop` the stage encodes every
step. Every process encodes the whole dataset, and a resumed run encodes it again (the cache is not checkpointed).

Caption dropout (`caption_dropout` > 0) replaces an item's caption by the empty one, decided after the flip with the
item's own seeded RNG: a resumed run drops the same captions. Both batch kinds carry each sample's caption text
("captions", "" where dropped) for the CLIP loss (stages/losses.py), which also keeps the VAE after caching.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stages import data

log = logging.getLogger(__name__)

ENCODE_BATCH = 16  # images or captions encoded at a time while caching
EMPTY_CAPTION = ""  # what a dropped caption becomes: the unconditional input of classifier-free guidance


def cacheable(p: dict) -> bool:
    """Whether the run caches latents; a log line when it was asked to but cannot."""
    if p["cache_latents"] and not p["center_crop"]:
        log.info("cache_latents needs center_crop (random crops differ every epoch): encoding at every step instead")
    return p["cache_latents"] and p["center_crop"]


class CachedItems:
    """Items {"latent_mean", "latent_std", "caption" (a row of the text cache)}, flipped at random if cached so."""

    def __init__(self, mean: Any, std: Any, captions: list[int]) -> None:
        self.mean, self.std, self.captions = mean, std, captions  # mean, std: flips x images x C x h x w

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        flip = int(self.mean.shape[0] > 1 and bool(torch.rand(1) < 0.5))
        return {"latent_mean": self.mean[flip, index], "latent_std": self.std[flip, index],
                "caption": self.captions[index]}


class CachedBatch:
    """collate_fn for CachedItems: stacked latent distributions, the text embeddings and texts of their captions."""

    def __init__(self, text: Any, distinct: list[str]) -> None:
        self.text, self.distinct = text, distinct  # row i of `text` embeds distinct[i]

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        import torch

        rows = [item["caption"] for item in items]
        return {"latent_mean": torch.stack([item["latent_mean"] for item in items]),
                "latent_std": torch.stack([item["latent_std"] for item in items]),
                "encoder_hidden_states": self.text[torch.tensor(rows)],
                "captions": [self.distinct[row] for row in rows]}


class TokenBatch:
    """collate_fn for data.CaptionedImages: stacked pixel values and caption token ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        import torch

        texts = [item["text"] for item in items]
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items]), "input_ids": tokens.input_ids,
                "captions": texts}


class CaptionDropout:
    """Items of `dataset` whose `key` is replaced by `empty` with probability `rate`, drawn after the item's own draws.

    Inside training.SeededItems the draw comes from the item's (seed, epoch, index) RNG, after the flip and crop that
    `dataset[index]` drew, so those stay what they were without dropout.
    """

    def __init__(self, dataset: Any, rate: float, key: str, empty: Any) -> None:
        self.dataset, self.rate, self.key, self.empty = dataset, rate, key, empty

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        item = self.dataset[index]
        return item | {self.key: self.empty} if bool(torch.rand(1) < self.rate) else item


def _stack_pixels(items: list[dict]) -> Any:
    import torch

    return torch.stack([item["pixel_values"] for item in items])


def encode_images(raw: Path, rows: list[dict], parts: dict, p: dict) -> tuple[Any, Any]:
    """Latent mean and std (fp32, CPU) of every image, unflipped and, with random_flip, flipped."""
    import torch

    dataset = data.CaptionedImages(raw, rows, data.train_transforms(p["resolution"], True, False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=ENCODE_BATCH, collate_fn=_stack_pixels,
                                         num_workers=p["dataloader_num_workers"])
    flips = (False, True) if p["random_flip"] else (False,)
    means: list[list] = [[] for _ in flips]
    stds: list[list] = [[] for _ in flips]
    with torch.no_grad():
        for pixels in tqdm(loader, desc="cache latents", unit="batch", disable=not parts["main_process"]):
            pixels = pixels.to(parts["device"], dtype=parts["frozen_dtype"])
            for k, flip in enumerate(flips):
                dist = parts["vae"].encode(pixels.flip(-1) if flip else pixels).latent_dist
                means[k].append(dist.mean.float().cpu())
                stds[k].append(dist.std.float().cpu())
    return torch.stack([torch.cat(m) for m in means]), torch.stack([torch.cat(s) for s in stds])


def encode_captions(rows: list[dict], parts: dict, extra: tuple[str, ...] = ()) -> tuple[Any, list[str], list[int]]:
    """Text embeddings of the distinct captions and `extra` (compute dtype, CPU), those texts, each row's index."""
    import torch

    distinct = list(dict.fromkeys([*(row["text"] for row in rows), *extra]))
    tokenizer, out = parts["tokenizer"], []
    with torch.no_grad():
        for start in range(0, len(distinct), ENCODE_BATCH):
            tokens = tokenizer(distinct[start:start + ENCODE_BATCH], padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")
            out.append(parts["text_encoder"](tokens.input_ids.to(parts["device"]), return_dict=False)[0].cpu())
    index = {text: i for i, text in enumerate(distinct)}
    return torch.cat(out), distinct, [index[row["text"]] for row in rows]


def cached_dataset(raw: Path, rows: list[dict], parts: dict, p: dict) -> tuple[Any, CachedBatch]:
    """Encode the dataset once, free the text encoder (and the VAE unless the CLIP loss decodes with it), and return
    the cached items, with caption dropout if asked, and their collate_fn."""
    import torch

    mean, std = encode_images(raw, rows, parts, p)
    dropout = p["caption_dropout"] > 0
    text, distinct, captions = encode_captions(rows, parts, (EMPTY_CAPTION,) if dropout else ())
    parts["text_encoder"] = None  # no longer needed: its memory goes to the UNet's training
    if p["clip_loss"]["weight"] == 0:
        parts["vae"] = None  # the CLIP loss decodes with it
    if parts["device"].type == "cuda":
        torch.cuda.empty_cache()
    mib = (mean.nbytes + std.nbytes) / 2**20, text.nbytes / 2**20
    log.info("cached latents of %d images x %d flips (%.0f MiB) and text embeddings of %d distinct captions "
             "(%.0f MiB) in memory", len(rows), mean.shape[0], mib[0], text.shape[0], mib[1])
    items: Any = CachedItems(mean, std, captions)
    if dropout:
        items = CaptionDropout(items, p["caption_dropout"], "caption", distinct.index(EMPTY_CAPTION))
    return items, CachedBatch(text, distinct)


def training_items(raw: Path, rows: list[dict], parts: dict, p: dict) -> tuple[Any, Any]:
    """The training items (cached latents, or images transformed at every step) and their collate_fn."""
    if cacheable(p):
        return cached_dataset(raw, rows, parts, p)
    transform = data.train_transforms(p["resolution"], p["center_crop"], p["random_flip"])
    items: Any = data.CaptionedImages(raw, rows, transform)
    if p["caption_dropout"] > 0:
        items = CaptionDropout(items, p["caption_dropout"], "text", EMPTY_CAPTION)
    return items, TokenBatch(parts["tokenizer"])


def batch_size(batch: dict) -> int:
    return len(next(iter(batch.values())))


def encode_batch(batch: dict, parts: dict) -> tuple[Any, Any]:
    """Scaled latents (sampled from their distribution) and text embeddings of a batch, cached or encoded now."""
    import torch

    device = parts["device"]
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = mean + std * torch.randn_like(mean)  # DiagonalGaussianDistribution.sample(), from the cache
        return latents * parts["latent_scale"], batch["encoder_hidden_states"].to(device)
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=parts["frozen_dtype"])
        latents = parts["vae"].encode(pixels).latent_dist.sample() * parts["latent_scale"]
        text = parts["text_encoder"](batch["input_ids"].to(device), return_dict=False)[0]
    return latents, text


def count_truncated(tokenizer: Any, captions: list[str]) -> int:
    """How many captions have more tokens (with start and end) than the text encoder reads; those are truncated."""
    ids = tokenizer(captions, truncation=False)["input_ids"]
    truncated = sum(len(one) > tokenizer.model_max_length for one in ids)
    if truncated:
        log.info("%d of %d captions are longer than the text encoder's %d tokens: they are truncated", truncated,
                 len(captions), tokenizer.model_max_length)
    return truncated
