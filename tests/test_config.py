"""Parameter validation: every bad value stops with one line naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import blip_check, clip_eval, finetune, generate, split
from stages.config import UserError, load_params

STUDY = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def params_file(tmp_path, section, **changes):
    params = {"shared": dict(STUDY["shared"]), section: dict(STUDY[section])}
    for key, value in changes.items():
        if value is KeyError:
            del params[section][key]
        else:
            params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize("module", [split, finetune, generate, clip_eval, blip_check])
def test_study_params_are_valid(module, repo_root):
    section = module.__name__.split(".")[-1]
    assert load_params(section, module.SCHEMA, repo_root / "params.yaml") == STUDY[section]


@pytest.mark.parametrize("section, schema, key, value, words", [
    ("finetune", finetune.SCHEMA, "epochs", KeyError, "missing key finetune.epochs"),
    ("finetune", finetune.SCHEMA, "epochs", 0, "finetune.epochs must be a positive integer"),
    ("finetune", finetune.SCHEMA, "train_batch_size", -2, "finetune.train_batch_size must be a positive integer"),
    ("finetune", finetune.SCHEMA, "learning_rate", "fast", "finetune.learning_rate must be a number > 0"),
    ("finetune", finetune.SCHEMA, "resolution", 250, "finetune.resolution must be a positive integer divisible by 8"),
    ("finetune", finetune.SCHEMA, "mixed_precision", "fp8", "finetune.mixed_precision must be one of no, fp16, bf16"),
    ("finetune", finetune.SCHEMA, "use_ema", "yes", "finetune.use_ema must be true or false"),
    ("generate", generate.SCHEMA, "prompts", [], "generate.prompts must be a non-empty list"),
    ("generate", generate.SCHEMA, "prompts", ["a cat", " "], "generate.prompts must be a non-empty list"),
    ("generate", generate.SCHEMA, "images_per_prompt", 0, "generate.images_per_prompt must be a positive integer"),
    ("generate", generate.SCHEMA, "scheduler", "magic", "generate.scheduler must be one of pndm"),
    ("blip_check", blip_check.SCHEMA, "style_words", [], "blip_check.style_words must be a non-empty list"),
    ("split", split.SCHEMA, "max_bad_fraction", 1.5, "split.max_bad_fraction must be a number between 0 and 1"),
])
def test_bad_parameter_names_the_key(tmp_path, section, schema, key, value, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        load_params(section, schema, params_file(tmp_path, section, **{key: value}))


def test_stage_prints_one_line_and_exits_2(tmp_path, repo_root):
    params_file(tmp_path, "finetune", epochs=-1)
    result = subprocess.run(
        [sys.executable, "-m", "stages.finetune", "a", "b", "c", "d", "e", "f"], cwd=tmp_path, capture_output=True,
        text=True, env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: finetune.epochs must be a positive integer, got -1; "
        "edit conf/ (or run `dvc exp run -S finetune.epochs=...`)"
    ]
