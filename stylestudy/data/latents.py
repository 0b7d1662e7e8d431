"""What the UNet trains on: VAE latents and text embeddings, encoded at every step or once per dataset.

With `cache_latents` the VAE's latent distribution (mean and std) of every training image, for both flips when
`random_flip` is on, and the text encoder's output for every distinct caption (and the empty one) are computed once:
by the `encode` stage (stages/encode.py) into safetensors files that `finetune` memory-maps, so that every experiment
that changes only training settings, a resumed run and every process of a multi-process run reuse them; or in memory
when no such folder is given (benchmarks and tests). Each step still samples its latents from the cached distribution
with the global (seeded) RNG, as `vae.encode(...).latent_dist.sample()` does, and each item's flip is drawn as
torchvision's RandomHorizontalFlip draws it (`torch.rand(1) < 0.5`, seeded per item by training.SeededItems): cached
and uncached runs train on the same flipped images. Random crops differ every epoch and cannot be cached: without
`center_crop` the stage encodes every step.

Caption dropout (`caption_dropout` > 0) replaces an item's caption by the empty one, decided after the flip with the
item's own seeded RNG: a resumed run drops the same captions. Both batch kinds carry each sample's caption text
("captions", "" where dropped) for the CLIP loss (stylestudy/train/losses.py), which also keeps the VAE after caching.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stylestudy.data import dataset
from stylestudy.core.config import UserError, require_path
from stylestudy.core.outputs import MANIFEST, sha256_of, write_json

log = logging.getLogger(__name__)

ENCODE_BATCH = 16  # images or captions encoded at a time while caching
EMPTY_CAPTION = ""  # what a dropped caption becomes: the unconditional input of classifier-free guidance
LATENTS_FILE, TEXT_FILE, INDEX_FILE = "latents.safetensors", "text.safetensors", "index.json"
# The finetune settings an encoding depends on: a cached folder made with other values is refused.
ENCODING_SETTINGS = ("resolution", "center_crop", "random_flip", "mixed_precision")
ENCODERS = ("vae/", "text_encoder/", "tokenizer/")  # the pipeline folders the encoding reads


@dataclass(frozen=True)
class Encoded:
    """A training split encoded once: latent mean and std (flips x images x C x h x w, fp32) in the order of
    file_names, and the text embeddings of the distinct captions (row i embeds captions[i], the empty one included)."""

    mean: Any
    std: Any
    text: Any
    captions: list[str]
    file_names: list[str]


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
    """collate_fn for dataset.CaptionedImages: stacked pixel values and caption token ids."""

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

    images = dataset.CaptionedImages(raw, rows, dataset.train_transforms(p["resolution"], True, False))
    loader = torch.utils.data.DataLoader(images, batch_size=ENCODE_BATCH, collate_fn=_stack_pixels,
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


def encode_captions(rows: list[dict], parts: dict) -> tuple[Any, list[str]]:
    """Text embeddings of the distinct captions and the empty one (compute dtype, CPU), and those texts."""
    import torch

    distinct = list(dict.fromkeys([*(row["text"] for row in rows), EMPTY_CAPTION]))
    tokenizer, out = parts["tokenizer"], []
    with torch.no_grad():
        for start in range(0, len(distinct), ENCODE_BATCH):
            tokens = tokenizer(distinct[start:start + ENCODE_BATCH], padding="max_length", truncation=True,
                               max_length=tokenizer.model_max_length, return_tensors="pt")
            out.append(parts["text_encoder"](tokens.input_ids.to(parts["device"]), return_dict=False)[0].cpu())
    return torch.cat(out), distinct


def encode_dataset(raw: Path, rows: list[dict], parts: dict, p: dict) -> Encoded:
    """Encode every training image (both flips with random_flip) and every distinct caption once."""
    mean, std = encode_images(raw, rows, parts, p)
    text, distinct = encode_captions(rows, parts)
    return Encoded(mean, std, text, distinct, [row["file_name"] for row in rows])


def encoder_digest(sd_dir: Path) -> str:
    """sha256 over the hashes of the VAE, text encoder and tokenizer files: fetch's manifest, else hashed now."""
    manifest = sd_dir / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
    else:
        files = {str(f.relative_to(sd_dir)): sha256_of(f) for f in sorted(sd_dir.rglob("*")) if f.is_file()}
    listing = sorted((name, digest) for name, digest in files.items() if name.startswith(ENCODERS))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def save_encoded(folder: Path, encoded: Encoded, settings: dict) -> None:
    """Write an encoding into `folder` (which the caller creates): two safetensors files and index.json."""
    from safetensors.torch import save_file

    save_file({"mean": encoded.mean.contiguous(), "std": encoded.std.contiguous()}, str(folder / LATENTS_FILE))
    save_file({"text": encoded.text.contiguous()}, str(folder / TEXT_FILE))
    write_json(folder / INDEX_FILE, settings | {"cached": True, "captions": encoded.captions,
                                                "file_names": encoded.file_names})


def check_encoded(folder: Path, rows: list[dict], p: dict, sd_dir: Path) -> dict:
    """index.json of the encoding in `folder`; one line when it was made from other images, settings or encoders
    (finetune's preflight asks before any process starts)."""
    index = json.loads(require_path(folder / INDEX_FILE, "run `dvc repro encode` first").read_text())
    if not index["cached"]:
        raise UserError(f"{folder}: not an encoding ({index['reason']}); set finetune.cache_latents and "
                        "finetune.center_crop to true and run `dvc repro encode`, or turn cache_latents off")
    differ = [f"finetune.{k} {index[k]!r} (now {p[k]!r})" for k in ENCODING_SETTINGS if index[k] != p[k]]
    if index["encoders"] != encoder_digest(sd_dir):
        differ.append(f"the VAE or text encoder of another {sd_dir}")
    if index["file_names"] != [row["file_name"] for row in rows]:
        differ.append("other training images")
    if differ:
        raise UserError(f"{folder} was encoded with {'; '.join(differ)}: run `dvc repro encode`")
    return index


def load_encoded(folder: Path, rows: list[dict], p: dict, sd_dir: Path) -> Encoded:
    """The encoding in `folder`, checked, memory-mapped: each process pages in only the items of its shard."""
    from safetensors.torch import load_file

    index = check_encoded(folder, rows, p, sd_dir)
    latents, text = load_file(str(folder / LATENTS_FILE)), load_file(str(folder / TEXT_FILE))
    return Encoded(latents["mean"], latents["std"], text["text"], index["captions"], index["file_names"])


def cached_dataset(encoded: Encoded, rows: list[dict], parts: dict, p: dict) -> tuple[Any, CachedBatch]:
    """Free the text encoder (and the VAE unless the CLIP loss decodes with it), and return the cached items, with
    caption dropout if asked, and their collate_fn."""
    import torch

    parts["text_encoder"] = None  # no longer needed: its memory goes to the UNet's training
    if p["clip_loss"]["weight"] == 0:
        parts["vae"] = None  # the CLIP loss decodes with it
    if parts["device"].type == "cuda":
        torch.cuda.empty_cache()
    row_of = {text: i for i, text in enumerate(encoded.captions)}
    mib = (encoded.mean.nbytes + encoded.std.nbytes) / 2**20, encoded.text.nbytes / 2**20
    log.info("cached latents of %d images x %d flips (%.0f MiB) and text embeddings of %d distinct captions "
             "(%.0f MiB)", len(rows), encoded.mean.shape[0], mib[0], encoded.text.shape[0], mib[1])
    items: Any = CachedItems(encoded.mean, encoded.std, [row_of[row["text"]] for row in rows])
    if p["caption_dropout"] > 0:
        items = CaptionDropout(items, p["caption_dropout"], "caption", row_of[EMPTY_CAPTION])
    return items, CachedBatch(encoded.text, encoded.captions)


def training_items(raw: Path, rows: list[dict], parts: dict, p: dict, encoded_dir: Path | None = None,
                   sd_dir: Path | None = None) -> tuple[Any, Any]:
    """The training items (cached latents: from the encode stage's folder when one is given, else encoded now; or
    images transformed at every step) and their collate_fn."""
    if cacheable(p):
        if encoded_dir is None:
            return cached_dataset(encode_dataset(raw, rows, parts, p), rows, parts, p)
        return cached_dataset(load_encoded(encoded_dir, rows, p, sd_dir), rows, parts, p)
    transform = dataset.train_transforms(p["resolution"], p["center_crop"], p["random_flip"])
    items: Any = dataset.CaptionedImages(raw, rows, transform)
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
