"""Parameter validation: every bad value or unknown key stops with one line naming the key, before any work."""
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, composed

from stylestudy.core.config import SCHEMAS, UserError, closest_key, load_params

STUDY = composed()
STAGES = [name for name in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]]


def params_file(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def changed(section: str, key: str, value) -> dict:
    params = copy.deepcopy(STUDY)
    if value is KeyError:
        del params[section][key]
    else:
        params[section][key] = value
    return params


@pytest.mark.parametrize("section", list(SCHEMAS))
def test_study_params_are_valid(section, tmp_path):
    assert load_params(section, params_file(tmp_path, STUDY)) == STUDY[section]


@pytest.mark.parametrize("section, key, value, words", [
    ("finetune", "epochs", KeyError, "missing key finetune.epochs"),
    ("finetune", "epochs", 0, "finetune.epochs must be a positive integer"),
    ("finetune", "train_batch_size", -2, "finetune.train_batch_size must be a positive integer"),
    ("finetune", "learning_rate", "fast", "finetune.learning_rate must be a number >= 0"),
    ("finetune", "learning_rate", -1e-4, "finetune.learning_rate must be a number >= 0"),
    ("encode", "resolution", 250, "encode.resolution must be a positive integer divisible by 8"),
    ("encode", "mixed_precision", "fp8", "encode.mixed_precision must be one of no, fp16, bf16"),
    ("finetune", "mixed_precision", "fp8", "finetune.mixed_precision must be one of no, fp16, bf16"),
    ("finetune", "use_ema", "yes", "finetune.use_ema must be true or false"),
    ("generate", "prompts", [], "generate.prompts must be a non-empty list"),
    ("generate", "prompts", ["a cat", " "], "generate.prompts must be a non-empty list"),
    ("generate", "images_per_prompt", 0, "generate.images_per_prompt must be a positive integer"),
    ("generate", "scheduler", "magic", "generate.scheduler must be one of pndm"),
    ("blip_check", "style_words", [], "blip_check.style_words must be a non-empty list"),
    ("split", "max_bad_fraction", 1.5, "split.max_bad_fraction must be a number between 0 and 1"),
    ("split", "min_image_size", 0, "split.min_image_size must be a positive integer"),
    ("finetune", "method", "dora", "finetune.method must be one of full, lora"),
    ("export", "date", "yesterday", "export.date must be a date YYYY-MM-DD, today or none"),
    ("finetune", "lora_rank", 0, "finetune.lora_rank must be a positive integer"),
    ("finetune", "snr_gamma", -1, "finetune.snr_gamma must be a number >= 0"),
    ("finetune", "caption_dropout", 1.5, "finetune.caption_dropout must be a number between 0 and 1"),
    ("finetune", "clip_loss", {"weight": -0.1, "kind": "global", "max_timestep": 200, "every": 1},
     "finetune.clip_loss.weight must be a number >= 0"),
    ("finetune", "clip_loss", {"weight": 0.1, "kind": "global", "max_timestep": 200, "every": 0},
     "finetune.clip_loss.every must be a positive integer"),
])
def test_a_bad_value_in_any_section_stops_every_stage(tmp_path, section, key, value, words):
    path = params_file(tmp_path, changed(section, key, value))
    for reader in ("shared", "fetch", section):  # the first stage to run finds it, not only the stage it concerns
        with pytest.raises(UserError, match=re.escape(words)):
            load_params(reader, path)


@pytest.mark.parametrize("override, words", [
    ("+finetune.lr=1", "unknown key finetune.lr (no stage reads it; closest known key: finetune.learning_rate)"),
    ("+finetune.learning_rat=1", "closest known key: finetune.learning_rate"),
    ("+generate.style_promt=x", "unknown key generate.style_promt (no stage reads it; closest known key: "
                                "generate.style_prompt)"),
    ("+fetch.data.n_imgs=3", "unknown key fetch.data.n_imgs"),
    ("+finetun.epochs=3", "unknown key finetun (no stage reads it; closest known key: finetune)"),
])
def test_an_unknown_key_names_the_closest_known_one(tmp_path, override, words):
    with pytest.raises(UserError, match=re.escape(words)):
        load_params("fetch", params_file(tmp_path, composed(override)))


def test_closest_key_prefers_initials_then_spelling():
    assert closest_key("lr", ["lr_scheduler", "learning_rate"]) == "learning_rate"
    assert closest_key("epoch", ["epochs", "ema_decay"]) == "epochs"


def test_split_fractions_that_do_not_sum_to_one_stop_before_any_image_is_read(tmp_path):
    params = changed("split", "fractions", {"train": 0.9, "val": 0.5, "test": 0.05})
    with pytest.raises(UserError, match=r"split.fractions must sum to 1, got .* \(sum 1.45\)"):
        load_params("fetch", params_file(tmp_path, params))


def stage_command(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_stage_prints_one_line_and_exits_2(tmp_path):
    params_file(tmp_path, changed("finetune", "epochs", -1))
    result = stage_command(tmp_path, "stages.finetune", "a", "b", "c", "d", "e", "f", "g", "h")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: finetune.epochs must be a positive integer, got -1; "
        "edit conf/ (or run `dvc exp run -S finetune.epochs=...`)"
    ]


def test_a_guidance_clip_folder_of_the_wrong_kind_is_one_line(tmp_path):
    from stylestudy.models import builders

    builders.save_tiny_sd(tmp_path / "sd", 0)
    params = composed("profile=smoke", "finetune.clip_loss.weight=0.1")
    params_file(tmp_path, params)
    (tmp_path / "split").mkdir()
    (tmp_path / "split/train.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    shutil.copytree(REPO / "conf/accelerate", tmp_path / "conf/accelerate")  # the launch settings pass the preflight
    result = stage_command(tmp_path, "stages.finetune", "sd", "sd", "sd", "split", "latents", "out", "live", "scratch")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: sd: no open_clip_config.json; expected an open_clip folder (config + open_clip_model.safetensors)")


def test_the_first_stage_refuses_a_typo_meant_for_a_later_one(tmp_path):
    params_file(tmp_path, composed("profile=smoke", "+finetune.lr=1"))
    result = stage_command(tmp_path, "stages.fetch", "data", "data/raw")
    assert result.returncode == 2 and not (tmp_path / "data").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error: params.yaml: unknown key finetune.lr")


@pytest.mark.parametrize("name", STAGES)
def test_help_explains_every_argument_the_params_read_and_an_example(name, tmp_path):
    result = stage_command(tmp_path, f"stages.{name}", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    items = stage.get("foreach", {}).values()
    stage = stage.get("do", stage)
    arguments = re.search(r"positional arguments:\n(.*?)\n\n", text, re.S).group(1)
    entries = re.split(r"\n(?=  \S)", arguments)  # an entry: its name, then its help on the same or next lines
    assert entries and all(len(entry.split()) > 2 for entry in entries), arguments
    for section in stage["params"]:
        section = section if isinstance(section, str) else next(iter(section))
        if section == "${item.also}":  # fetch: the section each item reads beside its own
            assert all(f"`{item['also']}`" in text for item in items), section
            continue
        assert (f"`{section.split('.')[0]}" if section != "params.yaml" else "params.yaml") in text, section
    assert re.search(rf"^Example: python -m stages\.{name} \S", text, re.M)


def test_the_training_seed_is_shared_seed_unless_set():
    """finetune.seed follows shared.seed by default (the study's numbers), and alone moves only training."""
    assert STUDY["finetune"]["seed"] == STUDY["shared"]["seed"]
    assert composed("shared.seed=7")["finetune"]["seed"] == 7
    replicate = composed("finetune.seed=3")
    assert (replicate["finetune"]["seed"], replicate["shared"]["seed"]) == (3, STUDY["shared"]["seed"])


def test_the_report_compares_with_the_study_defaults_resolved():
    """conf/config.yaml read as the study's settings equals the composed study: `${shared.seed}` shows as its value,
    not as a setting that differs."""
    from stages.report import study_defaults

    assert study_defaults(REPO / "conf/config.yaml") == STUDY
