"""A user's dataset loses nothing valid: an image with several captions gives one example per caption and the split
keeps them together; a repeated row counts once; a truncated or mismatched weights file is one line naming it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages import split
from stylestudy.core.config import UserError
from stylestudy.data.dataset import read_jsonl, read_metadata, write_jsonl
from stylestudy.data.sketches import make_synthetic_sketches
from stylestudy.models import families

SPLIT = {"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "max_bad_fraction": 0.05, "min_image_size": 32}


def run_split(raw: Path, tmp_path: Path) -> tuple[dict, dict[str, list[dict]]]:
    metrics = split.run(raw, tmp_path / "split", tmp_path / "split.json", SPLIT)
    return metrics, {name: read_jsonl(tmp_path / "split" / f"{name}.jsonl") for name in SPLIT["fractions"]}


def test_coco_style_captions_are_examples_and_an_image_never_straddles_splits(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_synthetic_sketches(raw, 30, 32, seed=0)
    images = read_metadata(raw)
    write_jsonl(raw / "metadata.jsonl", [{"file_name": row["file_name"], "text": f"{row['text']}, view {k}"}
                                         for k in range(5) for row in images])
    metrics, splits = run_split(raw, tmp_path)
    assert (metrics["n_examples"], metrics["n_images"], metrics["n_duplicate_rows"], metrics["n_skipped"]) == \
        (150, 30, 0, 0)
    assert sum(len(rows) for rows in splits.values()) == 150  # every caption is an example
    names = {name: {row["file_name"] for row in rows} for name, rows in splits.items()}
    assert not names["test"] & names["train"] and not names["val"] & (names["train"] | names["test"])
    assert names["test"] and all(len([r for r in splits["test"] if r["file_name"] == n]) == 5 for n in names["test"])


def test_a_repeated_row_counts_once_and_another_caption_is_another_example(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_synthetic_sketches(raw, 40, 32, seed=0)
    rows = read_metadata(raw)
    first, second = rows[0], rows[1]
    extra = [first | {"text": first["text"] + "  "},  # the same caption, but for its spaces: a repeat
             {"file_name": "./" + second["file_name"], "text": "another caption"}]  # the same file, spelled otherwise
    write_jsonl(raw / "metadata.jsonl", rows + extra)
    metrics, splits = run_split(raw, tmp_path)
    assert (metrics["n_examples"], metrics["n_images"], metrics["n_duplicate_rows"], metrics["n_skipped"]) == \
        (42, 40, 1, 0)
    kept = [row for rows_ in splits.values() for row in rows_]
    assert len(kept) == 41 and [r["text"] for r in kept if r["file_name"] == first["file_name"]] == [first["text"]]
    holding = [name for name, rows_ in splits.items() if any(r["text"] == "another caption" for r in rows_)]
    assert holding == [name for name, rows_ in splits.items() if any(r == second for r in rows_)]
    skipped = (tmp_path / "split" / "skipped.csv").read_text()
    assert f"{first['file_name']},duplicate row: the same file and caption as line 1" in skipped



def test_a_truncated_weights_file_is_named_once_with_the_remedy(sd_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "sd"
    shutil.copytree(sd_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError) as refused:
        families.load_pipeline(broken)
    message = str(refused.value)
    assert message.startswith(f"{weights}: not a whole safetensors file (truncated") and message.count(str(weights)) == 1
    assert "re-download it, or re-create" in message and "\n" not in message and "'. " not in message


def test_weights_of_other_shapes_say_so_in_one_line(sd_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "sd"
    shutil.copytree(sd_dir, other)
    config = other / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"cross_attention_dim": 64}))
    with pytest.raises(UserError) as refused:
        families.load_pipeline(other)
    message = str(refused.value)
    assert "weights of other shapes than its config.json names" in message and "expected shape" in message
    assert "\n" not in message and "low_cpu_mem_usage" not in message  # the library's advice stays out
