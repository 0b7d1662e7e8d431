"""split: check every example once and split the dataset deterministically by hashing file names.

Reads RAW_DIR (imagefolder from fetch) and params `split`, `shared`. Writes OUT_DIR/{train,val,test}.jsonl (rows of
file_name, text), OUT_DIR/skipped.csv (file_name, reason) and METRICS (counts).

Run: python -m stages.split RAW_DIR OUT_DIR METRICS
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from stages import data
from stages.config import FRACTION, POSITIVE_INT, UserError, cli, load_params, require_path
from stages.outputs import atomic_dir, write_csv, write_json

log = logging.getLogger(__name__)

SCHEMA = {"fractions": {"train": FRACTION, "val": FRACTION, "test": FRACTION}, "max_bad_fraction": FRACTION,
          "min_image_size": POSITIVE_INT}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def check_rows(raw: Path, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split rows into usable ones and skipped ones with a reason."""
    good, skipped, seen = [], [], set()
    for row in tqdm(rows, desc="check images", unit="img"):
        reason = "listed twice in metadata.jsonl" if row["file_name"] in seen else data.check_example(raw, row)
        seen.add(row["file_name"])
        if reason:
            skipped.append({"file_name": row["file_name"], "reason": reason})
        else:
            good.append({"file_name": row["file_name"], "text": row["text"].strip()})
    return good, skipped


def unlisted_images(raw: Path, rows: list[dict]) -> list[dict]:
    """Images in the folder that metadata.jsonl does not name: never trained on, but reported."""
    listed = {row["file_name"] for row in rows}
    return [
        {"file_name": str(path.relative_to(raw)), "reason": "not in metadata.jsonl"}
        for path in sorted(raw.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and str(path.relative_to(raw)) not in listed
    ]


def run(raw: Path, out: Path, metrics_path: Path, p: dict) -> dict:
    """Check, split and write; return the metrics."""
    rows = data.read_metadata(require_path(raw, "run the fetch stage first"))
    if not rows:
        raise UserError(f"{raw}/metadata.jsonl lists no examples; fetch a dataset with images")
    good, skipped = check_rows(raw, rows)
    bad_fraction = len(skipped) / len(rows)
    if bad_fraction > p["max_bad_fraction"]:
        raise UserError(f"{raw}: {len(skipped)} of {len(rows)} examples are unusable (first: {skipped[0]['file_name']}:"
                        f" {skipped[0]['reason']}); fix the data or raise split.max_bad_fraction")
    splits: dict[str, list[dict]] = {name: [] for name in p["fractions"]}
    for row in good:
        splits[data.split_of(row["file_name"], p["fractions"])].append(row)
    with atomic_dir(out) as tmp:
        for name, split_rows in splits.items():
            data.write_jsonl(tmp / f"{name}.jsonl", split_rows)
        write_csv(tmp / "skipped.csv", skipped + unlisted_images(raw, rows), ["file_name", "reason"])
    metrics = {"n_examples": len(rows), "n_skipped": len(skipped)} | {f"n_{k}": len(v) for k, v in splits.items()}
    write_json(metrics_path, metrics)
    log.info("split: %s", metrics)
    return metrics


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("raw", "out", "metrics"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args()
    run(args.raw, args.out, args.metrics, load_params("split", SCHEMA))


if __name__ == "__main__":
    main()
