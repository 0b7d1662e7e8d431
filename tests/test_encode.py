"""The encode stage: what finetune memory-maps is what it would have encoded itself, bit for bit; an encoding made with
other settings, images or encoders is refused with one line; random crops are not cached, and say so."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from stages import encode
from stylestudy.core.config import UserError
from stylestudy.data import dataset, latents
from stylestudy.models import builders
from stylestudy.models.families import sd2
from stylestudy.train import batches, checkpoints
from tests.conftest import composed
from tests.test_losses import build_models, make_inputs, settings_of


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[dict], dict]:
    """test_losses' inputs, with their rows as the split stage writes them in split/train.jsonl."""
    root = tmp_path_factory.mktemp("inputs")
    sd, guide, raw, metadata, p = make_inputs(root)
    rows = [{"file_name": r["file_name"], "text": r["text"]} for r in metadata]
    (root / "split").mkdir()
    dataset.write_jsonl(root / "split" / "train.jsonl", rows)
    return sd, guide, raw, rows, p


@pytest.fixture(scope="module")
def encoded_dir(inputs, tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("encoded") / "latents"
    encode.run(inputs[0], inputs[2], inputs[2].parent / "split", out, settings_of(inputs[4]))
    return out


def items_of(inputs: tuple, p: dict, encoded: Path | None, **encoding) -> list:
    """Every training item of epoch 0 as checkpoints.SeededItems draws them, collated one by one."""
    data = batches.training_data(inputs[2], inputs[3], build_models(inputs).encoders, settings_of(p, **encoding),
                                 p["caption_dropout"], encoded, inputs[0])
    items = checkpoints.SeededItems(batches.Numbered(data.items), 0)
    return [data.collate([items[i]]) for i in range(len(items))]


def test_the_stage_s_files_train_on_exactly_what_encoding_in_memory_gives(inputs, encoded_dir, one_thread):
    p = inputs[4] | {"caption_dropout": 0.5}
    from_files, in_memory = items_of(inputs, p, encoded_dir), items_of(inputs, p, None)
    for a, b in zip(from_files, in_memory):
        assert torch.equal(a.latent_mean, b.latent_mean) and torch.equal(a.latent_std, b.latent_std)
        assert torch.equal(a.conditioning.sequence, b.conditioning.sequence) and a.captions == b.captions
    assert any(item.captions == [latents.EMPTY_CAPTION] for item in from_files)  # dropout needs no re-encoding
    files = latents.load_encoded(encoded_dir, inputs[3], settings_of(inputs[4]), inputs[0], sd2.FAMILY)
    assert files.mean.shape[:2] == (2, 8)  # both flips of every image


def test_an_encoding_made_with_other_settings_images_or_encoders_is_refused_with_one_line(inputs, encoded_dir,
                                                                                         tmp_path):
    rows, settings, sd = inputs[3], settings_of(inputs[4]), inputs[0]
    with pytest.raises(UserError, match=r"encoded with encode.resolution 32 \(now 64\).*run `dvc repro encode`"):
        latents.load_encoded(encoded_dir, rows, settings_of(inputs[4], resolution=64), sd, sd2.FAMILY)
    with pytest.raises(UserError, match="other training images"):
        latents.load_encoded(encoded_dir, rows[:-1], settings, sd, sd2.FAMILY)
    other_sd = tmp_path / "sd"
    builders.save_random_sd(other_sd, 1, "tiny")
    with pytest.raises(UserError, match="the VAE or text encoder of another"):
        latents.load_encoded(encoded_dir, rows, settings, other_sd, sd2.FAMILY)


def test_random_crops_are_not_cached_and_the_fine_tune_encodes_every_step(inputs, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        encode.run(inputs[0], inputs[2], inputs[2].parent / "split", tmp_path / "latents",
                   settings_of(inputs[4], center_crop=False))
    assert "nothing cached (random crops (center_crop off))" in caplog.text
    assert sorted(f.name for f in (tmp_path / "latents").iterdir()) == [latents.INDEX_FILE]
    item = items_of(inputs, inputs[4], tmp_path / "latents", center_crop=False)[0]
    assert isinstance(item, batches.PixelBatch)
    with pytest.raises(UserError, match="not an encoding .*random crops"):
        latents.load_encoded(tmp_path / "latents", inputs[3], settings_of(inputs[4]), inputs[0], sd2.FAMILY)


def test_the_fine_tune_s_preflight_refuses_an_encoding_of_another_resolution_in_one_line(inputs, encoded_dir,
                                                                                        tmp_path):
    import subprocess
    import sys

    import yaml

    params = composed("profile=smoke")
    params["encode"]["resolution"] = 64
    config = Path(__file__).parents[1] / params["finetune"]["launch"]["config_file"]  # run outside the repository
    params["finetune"]["launch"]["config_file"] = str(config)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sd, guide, raw = inputs[0], inputs[1], inputs[2]
    args = [str(sd), str(guide), str(raw), str(raw.parent / "split"), str(encoded_dir), "out", "live", "scratch"]
    result = subprocess.run([sys.executable, "-m", "stages.finetune", "--preflight", *args], cwd=tmp_path,
                            capture_output=True, text=True, env={**__import__("os").environ,
                                                                 "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "encode.resolution 32 (now 64)" in lines[-1]
    assert "Traceback" not in result.stderr
