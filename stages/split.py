"""split: check every example once and split the dataset deterministically by hashing file names.

Reads RAW_DIR (imagefolder from fetch, with its fetch_skipped.csv where fetch left files out) and params `split`,
`shared`. Writes OUT_DIR/{train,val,test}.jsonl (rows of file_name, text), OUT_DIR/skipped.csv (file_name, reason)
and METRICS (counts). When more than split.max_bad_fraction of the examples are unusable, OUT_DIR holds skipped.csv
alone and the stage fails.

Run: python -m stages.split RAW_DIR OUT_DIR METRICS (params.yaml is validated whole before any work)
Example: python -m stages.split data/raw data/split reports/split.json
"""
from __future__ import annotations

import logging
from collections import Counter
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


def check_rows(raw: Path, rows: list[dict], left_out: dict[str, str], min_size: int) -> tuple[list[dict], list[dict]]:
    """Split rows into usable ones and skipped ones with a reason."""
    good, skipped, seen = [], [], set()
    for row in tqdm(rows, desc="check images", unit="img"):
        name, key = row["file_name"], dataset.name_key(row["file_name"])
        reason = "listed twice in metadata.jsonl" if key in seen else (
            fetch_reason(left_out, name) or dataset.check_example(raw, row, min_size))
        seen.add(key)
        if reason:
            skipped.append({"file_name": name, "reason": reason})
        else:
            good.append({"file_name": name, "text": row["text"].strip()})
    return good, skipped


def unlisted(raw: Path, rows: list[dict], left_out: dict[str, str]) -> list[dict]:
    """Images in the folder that metadata.jsonl does not name, and what fetch left out that no row names.

    Never trained on, reported, not counted against split.max_bad_fraction.
    """
    listed = {dataset.name_key(row["file_name"]) for row in rows}
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
    rows = dataset.read_metadata(require_path(raw, "run the fetch stage first"))
    if not rows:
        raise UserError(f"{raw}/metadata.jsonl lists no examples; fetch a dataset with images")
    left_out = dataset.fetch_skipped(raw)
    good, skipped = check_rows(raw, rows, left_out, p["min_image_size"])
    report = skipped + unlisted(raw, rows, left_out)
    if len(skipped) / len(rows) > p["max_bad_fraction"]:
        write_splits(out, {}, report)  # the list to fix, and no split files: nothing looks complete
        raise UserError(f"{raw}: {len(skipped)} of {len(rows)} examples are unusable ({reason_counts(skipped)}; all "
                        f"listed in {out / 'skipped.csv'}); fix the data or raise split.max_bad_fraction")
    splits: dict[str, list[dict]] = {name: [] for name in p["fractions"]}
    for row in good:
        splits[dataset.split_of(row["file_name"], p["fractions"])].append(row)
    write_splits(out, splits, report)
    metrics = {"n_examples": len(rows), "n_skipped": len(skipped)} | {f"n_{k}": len(v) for k, v in splits.items()}
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
