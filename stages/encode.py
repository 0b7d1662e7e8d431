"""encode: the VAE latent distributions (both flips) and caption conditioning of the training split, once per dataset.

They depend only on the data, the split, the VAE and text encoders, and the `encode` params, so
`dvc exp run -S finetune.learning_rate=...` (or any other training-only setting) re-runs `finetune` and what follows,
but not this stage; a resumed or multi-process fine-tune memory-maps the files instead of encoding.
Random crops differ every epoch and cannot be cached: with `encode.center_crop: false` (or `cache_latents: false`)
the stage says so in one line, writes only index.json, and `finetune` encodes every step.
Reads SD_DIR (pipeline folder: its VAE, text encoders and tokenizers, through its model family), RAW_DIR,
SPLIT_DIR/train.jsonl and params `encode` and `model` (the family, SD3's T5 length, SDXL's VAE precision). Writes
OUT_DIR/latents.safetensors (mean, std: flips x images x C x h x w, fp32; crop: flips x images x 6, each image's
original size, crop top-left and target size, SDXL's time ids), OUT_DIR/text.safetensors (text: distinct
captions x tokens x width; pooled: captions x width where the family has pooled embeddings) and OUT_DIR/index.json
(the settings and encoders it was made with, captions, file names in order).

Run: python -m stages.encode SD_DIR RAW_DIR SPLIT_DIR OUT_DIR (params.yaml is validated whole first)
Example: python -m stages.encode models/pretrained/sd data/raw data/split data/latents
"""
from __future__ import annotations

import logging
from pathlib import Path

from stylestudy.data import dataset, latents
from stylestudy.models import families
from stylestudy.core.config import UserError, cli, load_params, parse_args, require_path
from stylestudy.core.outputs import atomic_dir, write_json

log = logging.getLogger(__name__)


def run(sd_dir: Path, raw: Path, split: Path, out: Path, settings: latents.EncodeSettings,
        family: families.Family = families.FAMILIES["sd2"]) -> dict:
    """Encode the training split into `out` with `family`'s encoders (or record why it is not cached); return
    index.json's settings."""
    from accelerate import PartialState

    family = families.check_pipeline_folder(sd_dir, family)
    rows = dataset.read_jsonl(require_path(split / "train.jsonl", "run the split stage first"))
    if not rows:
        raise UserError(f"{split}/train.jsonl is empty; raise split.fractions.train or add data")
    recorded = settings.recorded() | family.encoding_settings() | {"encoders": latents.encoder_digest(sd_dir, family)}
    with atomic_dir(out) as tmp:
        if not latents.cacheable(settings):
            reason = "encode.cache_latents is off" if not settings.cache_latents else "random crops (center_crop off)"
            log.info("encode: nothing cached (%s): finetune encodes every step", reason)
            write_json(tmp / latents.INDEX_FILE, recorded | {"cached": False, "reason": reason})
            return recorded
        # on the device and in the dtype that the fine-tune gives the encoders: its numbers do not depend on where
        # the encoding ran
        device = PartialState().device
        encoders = family.load_encoders(sd_dir, device, settings.encoders_dtype(device))
        encoded = latents.encode_dataset(raw, rows, encoders, settings)
        latents.save_encoded(tmp, encoded, recorded)
    log.info("encode: %d images x %d flips, %d distinct captions", len(rows), encoded.mean.shape[0],
             len(encoded.captions))
    return recorded


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "sd": "the pretrained pipeline folder (models/pretrained/sd)", "raw": "the imagefolder (data/raw)",
        "split": "the split folder whose train.jsonl lists the training images (data/split)",
        "out": "the folder to write the encoding into (data/latents)",
    })
    run(args.sd, args.raw, args.split, args.out, latents.EncodeSettings(**load_params("encode")),
        families.from_params(load_params("model")))


if __name__ == "__main__":
    main()
