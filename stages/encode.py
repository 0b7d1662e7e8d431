"""encode: the VAE latent distributions (both flips) and text embeddings of the training split, once per dataset.

They depend only on the data, the split, the VAE and text encoder, and the resolution, crop, flip and precision
settings, so `dvc exp run -S finetune.learning_rate=...` (or any other training-only setting) re-runs `finetune` and
what follows, but not this stage; a resumed or multi-process fine-tune memory-maps the files instead of encoding.
Random crops differ every epoch and cannot be cached: with `finetune.center_crop: false` (or `cache_latents: false`)
the stage says so in one line, writes only index.json, and `finetune` encodes every step.
Reads SD_DIR (pipeline folder: its VAE, text encoder and tokenizer), RAW_DIR, SPLIT_DIR/train.jsonl and params
`finetune.{resolution,center_crop,random_flip,cache_latents,mixed_precision,dataloader_num_workers}`.
Writes OUT_DIR/latents.safetensors (mean, std: flips x images x C x h x w, fp32), OUT_DIR/text.safetensors (text:
distinct captions x tokens x width) and OUT_DIR/index.json (the settings and encoders it was made with, captions,
file names in order).

Run: python -m stages.encode SD_DIR RAW_DIR SPLIT_DIR OUT_DIR (params.yaml is validated whole first)
Example: python -m stages.encode models/pretrained/sd data/raw data/split data/latents
"""
from __future__ import annotations

import logging
from pathlib import Path

from stylestudy.data import dataset, latents
from stylestudy.models import loading
from stylestudy.core.config import UserError, cli, load_params, parse_args, require_path
from stylestudy.core.outputs import atomic_dir, write_json

log = logging.getLogger(__name__)


def load_encoders(sd_dir: Path, mixed_precision: str) -> dict:
    """The tokenizer, text encoder and VAE of a pipeline folder, frozen, on the device and in the dtype that the
    fine-tune gives them (so that its numbers do not depend on where the encoding ran)."""
    from accelerate import PartialState
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    loading.check_sd_folder(sd_dir)
    loading.quiet_libraries()
    device = PartialState().device
    dtype = loading.frozen_dtype(loading.precision_that_runs(mixed_precision), device)
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder", use_safetensors=True)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval().to(device, dtype=dtype)
    return {"tokenizer": CLIPTokenizer.from_pretrained(sd_dir, subfolder="tokenizer"), "text_encoder": text_encoder,
            "vae": vae, "device": device, "frozen_dtype": dtype, "main_process": True}


def run(sd_dir: Path, raw: Path, split: Path, out: Path, p: dict) -> dict:
    """Encode the training split into `out` (or record why it is not cached); return index.json's settings."""
    rows = dataset.read_jsonl(require_path(split / "train.jsonl", "run the split stage first"))
    if not rows:
        raise UserError(f"{split}/train.jsonl is empty; raise split.fractions.train or add data")
    settings = {k: p[k] for k in latents.ENCODING_SETTINGS} | {"encoders": latents.encoder_digest(sd_dir)}
    with atomic_dir(out) as tmp:
        if not latents.cacheable(p):
            reason = "finetune.cache_latents is off" if not p["cache_latents"] else "random crops (center_crop off)"
            log.info("encode: nothing cached (%s): finetune encodes every step", reason)
            write_json(tmp / latents.INDEX_FILE, settings | {"cached": False, "reason": reason})
            return settings
        encoded = latents.encode_dataset(raw, rows, load_encoders(sd_dir, p["mixed_precision"]), p)
        latents.save_encoded(tmp, encoded, settings)
    log.info("encode: %d images x %d flips, %d distinct captions", len(rows), encoded.mean.shape[0],
             len(encoded.captions))
    return settings


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "sd": "the pretrained pipeline folder (models/pretrained/sd)", "raw": "the imagefolder (data/raw)",
        "split": "the split folder whose train.jsonl lists the training images (data/split)",
        "out": "the folder to write the encoding into (data/latents)",
    })
    run(args.sd, args.raw, args.split, args.out, load_params("finetune"))


if __name__ == "__main__":
    main()
