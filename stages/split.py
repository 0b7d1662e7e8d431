"""split: check every example once and split the dataset deterministically by hashing image names.

An example is a row of metadata.jsonl: an image and a caption. An image listed in several rows with different
captions (COCO-style datasets give five per image) gives one example per distinct caption, and the split assigns by
image, never by row: all captions of an image land in the same split. A row repeating an earlier one (the same file
and caption) counts once; the repeat is listed in skipped.csv as a duplicate, not counted as unusable. A line that is
not a JSON object naming a file is skipped with its line number, and counted as unusable like a bad image.

Reads RAW_DIR (imagefolder from fetch, with its fetch_skipped.csv where fetch left files out) and params `split`.
Writes OUT_DIR/{train,val,test}.jsonl (rows of file_name, text), OUT_DIR/skipped.csv (file_name, reason) and METRICS
(counts: examples, distinct images used, duplicate rows, skipped rows, per split). When more than
split.max_bad_fraction of the examples are unusable, OUT_DIR holds skipped.csv alone and the stage fails.

Run: python -m stages.split RAW_DIR OUT_DIR METRICS (params.yaml is validated whole before any work)
Example: python -m stages.split data/raw data/split reports/split.json
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from stylestudy.data import dataset
from stylestudy.core.config import UserError, cli, load_params, parse_args, require_path
from stylestudy.core.outputs import atomic_dir, write_csv, write_json

log = logging.getLogger(__name__)

HEADER = ["file_name", "reason"]


def fetch_reason(left_out: dict[str, str], file_name: str) -> str | None:
    """Why fetch left this file, or a folder above it, out of the dataset (a link leaving it, ...), or None."""
    path = PurePosixPath(file_name)
    return next((left_out[str(p)] for p in (path, *path.parents) if str(p) in left_out), None)


@dataclass
class Checked:
    """The rows of metadata.jsonl sorted out: usable examples, unusable ones (with the reason), repeated ones."""

    good: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)


def check_rows(raw: Path, rows: list[tuple[int, dict]], left_out: dict[str, str], min_size: int) -> Checked:
    """Sort (line number, row) pairs into usable examples, skipped ones with a reason, and repeats of earlier rows."""
    checked, first_line = Checked(), {}
    for number, row in tqdm(rows, desc="check images", unit="img"):
        name, text = row["file_name"], row.get("text")
        pair = (dataset.name_key(name), text.strip() if isinstance(text, str) else None)
        if pair[1] is not None and pair in first_line:
            checked.duplicates.append({"file_name": name, "reason": "duplicate row: the same file and caption as "
                                                                    f"line {first_line[pair]}"})
            continue
        first_line[pair] = number
        reason = fetch_reason(left_out, name) or dataset.check_example(raw, row, min_size)
        if reason:
            checked.skipped.append({"file_name": name, "reason": reason})
        else:
            checked.good.append({"file_name": name, "text": text.strip()})
    return checked


def bad_lines(bad: list[tuple[int, str]]) -> list[dict]:
    """skipped.csv rows for the lines of metadata.jsonl that are no example at all."""
    return [{"file_name": "", "reason": f"not a row of {dataset.METADATA} (line {number}: {reason})"}
            for number, reason in bad]


def unlisted(raw: Path, rows: list[tuple[int, dict]], left_out: dict[str, str]) -> list[dict]:
    """Images in the folder that metadata.jsonl does not name, and what fetch left out that no row names.

    Never trained on, reported, not counted against split.max_bad_fraction.
    """
    listed = {dataset.name_key(row["file_name"]) for _, row in rows}
    on_disk = [path.relative_to(raw).as_posix() for path in sorted(raw.rglob("*")) if path.is_file()]
    return [{"file_name": name, "reason": "not in metadata.jsonl"} for name in on_disk
            if PurePosixPath(name).suffix.lower() in dataset.IMAGE_SUFFIXES and name not in listed] + [
        {"file_name": name, "reason": reason} for name, reason in left_out.items() if name not in listed]


def reason_counts(skipped: list[dict]) -> str:
    """How many of each kind of reason, most frequent first: '3 not decodable, 2 empty caption'."""
    kinds = Counter(row["reason"].split(":")[0].split(" (")[0] for row in skipped)
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())


def write_splits(out: Path, splits: dict[str, list[dict]], skipped: list[dict]) -> None:
    """Replace `out` with the split files and skipped.csv, whole."""
    with atomic_dir(out) as tmp:
        for name, split_rows in splits.items():
            dataset.write_jsonl(tmp / f"{name}.jsonl", split_rows)
        write_csv(tmp / "skipped.csv", skipped, HEADER)


def run(raw: Path, out: Path, metrics_path: Path, p: dict) -> dict:
    """Check, split and write; return the metrics."""
    bad: list[tuple[int, str]] = []
    rows = dataset.read_metadata_lines(require_path(raw, "run the fetch stage first"), bad)
    if not rows:
        raise UserError(f"{raw}/metadata.jsonl lists no examples; fetch a dataset with images")
    left_out = dataset.fetch_skipped(raw)
    checked = check_rows(raw, rows, left_out, p["min_image_size"])
    skipped, n_examples = bad_lines(bad) + checked.skipped, len(rows) + len(bad)
    report = skipped + checked.duplicates + unlisted(raw, rows, left_out)
    if len(skipped) / n_examples > p["max_bad_fraction"]:
        write_splits(out, {}, report)  # the list to fix, and no split files: nothing looks complete
        raise UserError(f"{raw}: {len(skipped)} of {n_examples} examples are unusable ({reason_counts(skipped)}; all "
                        f"listed in {out / 'skipped.csv'}); fix the data or raise split.max_bad_fraction")
    splits: dict[str, list[dict]] = {name: [] for name in p["fractions"]}
    for row in checked.good:
        splits[dataset.split_of(row["file_name"], p["fractions"])].append(row)
    write_splits(out, splits, report)
    images = {dataset.name_key(row["file_name"]) for row in checked.good}
    metrics = {"n_examples": n_examples, "n_images": len(images), "n_duplicate_rows": len(checked.duplicates),
               "n_skipped": len(skipped)} | {f"n_{k}": len(v) for k, v in splits.items()}
    write_json(metrics_path, metrics)
    log.info("split: %s", metrics)
    return metrics


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "raw": "the imagefolder fetched (data/raw)", "out": "the folder to write the splits into (data/split)",
        "metrics": "the counts JSON to write (reports/split.json)",
    })
    run(args.raw, args.out, args.metrics, load_params("split"))


if __name__ == "__main__":
    main()
