"""A user's own dataset folder through the real DVC commands: nothing outside it is read, a change to it is seen.

The folder holds a symbolic link to a file outside it (with a marker string) and one to an outside folder; neither
target may reach an output, a manifest or the DVC cache. Adding images and running the same `dvc exp run` again
fetches and trains on them; running it once more with no change runs nothing.
"""
import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import fresh_copy, sh

from stylestudy.data.dataset import read_jsonl, write_jsonl
from stylestudy.data.sketches import make_synthetic_sketches

MARKER = ("outside-the-dataset-" + uuid.uuid4().hex).encode()  # made at run time: no source file holds it
pytestmark = pytest.mark.slow


def own_dataset(root: Path) -> Path:
    """40 sketches, a link to an outside file and one to an outside folder, both listed in metadata.jsonl."""
    folder, outside = root / "my-style", root / "outside"
    make_synthetic_sketches(folder, 40, 48, seed=5)
    make_synthetic_sketches(outside, 2, 48, seed=6)
    (outside / "00000.png").write_bytes((outside / "00000.png").read_bytes() + MARKER)  # still a decodable PNG
    (outside / "secret.txt").write_bytes(MARKER)
    (folder / "leak.png").symlink_to(outside / "00000.png")
    (folder / "leak_dir").symlink_to(outside, target_is_directory=True)
    rows = read_jsonl(folder / "metadata.jsonl")
    write_jsonl(folder / "metadata.jsonl", rows + [{"file_name": "leak.png", "text": "a leaked file"},
                                                   {"file_name": "leak_dir/00001.png", "text": "a leaked folder"}])
    return folder


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("own")
    folder = own_dataset(root)
    repo = fresh_copy(root / "repo")
    command = ("dvc", "exp", "run", "-S", "profile=smoke", "-S", "fetch.data.source=local", "-S",
               f"fetch.data.path={folder}")
    return SimpleNamespace(root=repo, folder=folder, command=command, log=sh(repo, *command))


def trained_on(clone: SimpleNamespace) -> set[str]:
    return {row["file_name"] for row in read_jsonl(clone.root / "data/split/train.jsonl")}


def test_links_that_leave_the_folder_are_skipped_and_their_bytes_copied_nowhere(clone):
    skipped = (clone.root / "data/split/skipped.csv").read_text()
    assert "leak.png" in skipped and "leak_dir/00001.png" in skipped
    assert "leak.png" not in trained_on(clone)
    for path in clone.root.rglob("*"):  # the DVC cache in .dvc/cache included
        if path.is_file() and not path.is_symlink():
            assert MARKER not in path.read_bytes(), path


def test_added_images_are_fetched_and_trained_on(clone):
    before = trained_on(clone)
    make_synthetic_sketches(clone.folder / "more", 12, 48, seed=7)
    added = [{"file_name": f"more/{row['file_name']}", "text": row["text"]}
             for row in read_jsonl(clone.folder / "more/metadata.jsonl")]
    (clone.folder / "more/metadata.jsonl").unlink()
    write_jsonl(clone.folder / "metadata.jsonl", read_jsonl(clone.folder / "metadata.jsonl") + added)
    log = sh(clone.root, *clone.command)
    for stage in ("fetch@data", "split", "finetune"):
        assert f"Running stage '{stage}'" in log
    assert trained_on(clone) > before and trained_on(clone) & {row["file_name"] for row in added}
    info = json.loads((clone.root / "models/finetuned/training_info.json").read_text())
    assert info["n_train_images"] == len(trained_on(clone))


def test_the_same_run_with_no_change_runs_nothing(clone):
    assert "Running stage" not in sh(clone.root, *clone.command)
