"""embed_real: CLIP and CSD image embeddings of the held-out real sketches (the test split), once per split.

`clip_eval` measures how far each model's generated images lie from these (KID, CMMD, style similarity). They depend
on the data, the split and the scoring CLIP only, so an experiment that changes training or generation reuses them
from DVC's cache. An image listed with several captions is one real sketch. An image that fails to decode is
skipped and counted, never a traceback.
Reads CLIP_DIR (open_clip local-dir folder), CSD_DIR (the CSD style embedder), RAW_DIR (imagefolder),
SPLIT_DIR/test.jsonl and params `embed_real`. Writes OUT_DIR/embeddings.safetensors (normalised float32 rows: CLIP's
under `embeddings`, CSD's under `csd`), OUT_DIR/files.csv (file_name per row), OUT_DIR/skipped.csv (file_name,
reason) and OUT_DIR/info.json (which CLIP and CSD, counts).

Run: python -m stages.embed_real CLIP_DIR CSD_DIR RAW_DIR SPLIT_DIR OUT_DIR (params.yaml is validated whole first)
Example: python -m stages.embed_real models/pretrained/clip models/pretrained/csd data/raw data/split \
         data/real_embeddings
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stylestudy.data import dataset
from stylestudy.evaluate import embeddings
from stylestudy.models import csd, loading
from stylestudy.core.config import cli, load_params, parse_args, require_path
from stylestudy.core.outputs import atomic_dir, write_csv

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def decodable(raw: Path, rows: list[dict]) -> tuple[list[tuple[str, Image.Image]], list[dict]]:
    """(file_name, RGB image) of every row whose image opens; a skipped row with the reason for each other one."""
    images, skipped = [], []
    for row in rows:
        try:
            images.append((row["file_name"], dataset.load_rgb(raw / row["file_name"])))
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises on a missing, torn or corrupt file
            skipped.append({"file_name": row["file_name"], "reason": f"not decodable: {type(error).__name__}: {error}"})
    return images, skipped


def embedders(clip_dir: Path, csd_dir: Path) -> dict[str, tuple[Any, Any]]:
    """The scoring CLIP and the CSD style embedder with their preprocessing, by the name their embeddings are stored
    under, on the inference device."""
    import torch

    device, dtype = loading.inference_device()
    clip, preprocess, _ = loading.load_clip(clip_dir, device, half=dtype == torch.float16)
    return {embeddings.EMBEDDINGS_KEY: (clip, preprocess), embeddings.CSD_KEY: csd.load(csd_dir, device, dtype)}


def embed_split(models: dict[str, tuple[Any, Any]], raw: Path, rows: list[dict],
                batch_size: int) -> tuple[dict[str, np.ndarray], list[str], list[dict]]:
    """Each embedder's embeddings of the rows' images, decoded one batch at a time (a split's full-size images need
    not fit in memory), with the names embedded and the rows skipped."""
    vectors: dict[str, list] = {name: [] for name in models}
    names, skipped = [], []
    for batch in embeddings.batches(rows, batch_size, "embed real sketches"):
        images, bad = decodable(raw, batch)
        skipped += bad
        if images:
            for name, (model, preprocess) in models.items():
                vectors[name].append(embeddings.embed_images(model, preprocess, [im for _, im in images], batch_size,
                                                             None))
            names += [name for name, _ in images]
    stacked = {name: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for name, v in vectors.items()}
    return stacked, names, skipped


def run(clip_dir: Path, csd_dir: Path, raw: Path, split: Path, out: Path, p: dict) -> dict:
    """Embed the test split's images into `out` with CLIP and CSD; return the info written beside them."""
    loading.check_clip_folder(clip_dir)
    rows = dataset.read_jsonl(require_path(split / "test.jsonl", "run the split stage first"))
    # one real sketch per image, however many captions list it (the split keeps all of an image's rows together)
    images = list({dataset.name_key(row["file_name"]): row for row in rows}.values())
    vectors, names, skipped = embed_split(embedders(clip_dir, csd_dir), raw, images, p["batch_size"])
    if skipped:
        log.warning("embed_real: %d of %d test images do not decode and are skipped (first: %s); see %s",
                    len(skipped), len(images), skipped[0]["file_name"], out / "skipped.csv")
    if not names:
        log.warning("embed_real: %s holds no usable test images: the distance to real sketches is skipped", split)
    info = {"clip": embeddings.describe_clip(clip_dir), "csd": embeddings.describe_csd(csd_dir),
            "n_test_rows": len(rows), "n_test_images": len(images),
            "n_embedded": len(names), "n_skipped": len(skipped)}
    with atomic_dir(out) as tmp:
        embeddings.save_real(tmp, vectors, info)
        write_csv(tmp / "files.csv", [{"file_name": name} for name in names], ["file_name"])
        write_csv(tmp / "skipped.csv", skipped, ["file_name", "reason"])
    log.info("embed_real: %d test sketches embedded, %d skipped", len(names), len(skipped))
    return info


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "clip_dir": "an open_clip local-dir folder: the scoring CLIP (models/pretrained/clip)",
        "csd_dir": "the CSD style embedder's folder (models/pretrained/csd)",
        "raw": "the imagefolder fetched (data/raw)",
        "split": "the split folder whose test.jsonl lists the held-out sketches (data/split)",
        "out": "the folder to write the embeddings into (data/real_embeddings)",
    })
    run(args.clip_dir, args.csd_dir, args.raw, args.split, args.out, load_params("embed_real"))


if __name__ == "__main__":
    main()
