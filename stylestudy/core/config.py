"""Reading and validating params.yaml, the rules of all its sections, and the command line every stage shares.

Every stage validates the whole of params.yaml (every section, unknown keys included) before it does any work, so a
mistyped setting stops the first stage that runs, with one line naming the key and the closest known one.
"""
from __future__ import annotations

import argparse
import atexit
import difflib
import functools
import gc
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

PARAMS_FILE = Path("params.yaml")
OUR_LOGGERS = ("__main__", "stages", "stylestudy")  # INFO shown; the libraries' stays hidden
EDIT_HINT = "edit conf/ (or run `dvc exp run -S {key}=...`)"


class UserError(Exception):
    """A problem the user can fix (bad parameter, missing file, wrong folder): printed as one line, exit code 2."""


@dataclass(frozen=True)
class Rule:
    """What a parameter must be, in the words an error message uses, and the test for it."""

    what: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


NUMBER = Rule("a number", _is_number)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))
NON_EMPTY_STRING = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
POSITIVE_INT = Rule("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE_NUMBER = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Rule("a number between 0 and 1", lambda v: _is_number(v) and 0 <= v <= 1)
MULTIPLE_OF_8 = Rule("a positive integer divisible by 8", lambda v: _is_int(v) and v > 0 and v % 8 == 0)


def _is_date_today_or_none(v: Any) -> bool:
    """An ISO-8601 calendar date (a string, or the date YAML reads from an unquoted one), or the word today or none."""
    import datetime

    if v in ("today", "none") or (isinstance(v, datetime.date) and not isinstance(v, datetime.datetime)):
        return True
    try:
        return isinstance(v, str) and datetime.date.fromisoformat(v).isoformat() == v
    except ValueError:
        return False


DATE_TODAY_OR_NONE = Rule("a date YYYY-MM-DD, today or none", _is_date_today_or_none)


def one_of(*choices: str) -> Rule:
    return Rule("one of " + ", ".join(choices), lambda v: v in choices)


def non_empty_list_of(rule: Rule) -> Rule:
    return Rule(f"a non-empty list, each {rule.what}", lambda v: isinstance(v, list) and bool(v) and all(map(rule.ok, v)))


# ---------------------------------------------------------------------------------------------------- the sections

FETCH_KINDS = ("sd", "clip", "blip", "guide", "data", "vd", "csd")
RANDOM_SOURCES = ("tiny", "full")  # random weights built from configs: the smoke size and the study's size
SD_VARIANTS = {"sd3": ("sd35",)}  # fetch.sd.variant beside `default`: SD3.5 Medium's shapes, trained as family sd3


def fetch_schema(kind: str) -> dict[str, Rule]:
    special = {"data": ("hub", "local", "synthetic"), "vd": ("hub", "local", "tiny")}
    sources = special.get(kind, ("hub", "local", *RANDOM_SOURCES))
    rules = {"source": one_of(*sources), "repo_id": STRING, "revision": STRING, "path": STRING}
    if kind == "data":
        rules |= {"n_images": POSITIVE_INT, "image_size": POSITIVE_INT}
    if kind == "sd":  # random sources: whose shapes they take, the family's model's (default) or another of its models
        rules |= {"variant": one_of("default", *sum(SD_VARIANTS.values(), ()))}
    if kind == "vd":  # the baseline generator: the one setting that turns generate@vd on
        rules |= {"enabled": BOOL}
    return rules


# The model families (stylestudy/models/families/) and their params `model`: chosen with `-S model=<family>`.
SCHEDULERS = {"sd2": ("pndm", "ddim", "dpmsolver++", "euler"), "sd3": ("flow_euler",),
              "sdxl": ("euler", "pndm", "ddim", "dpmsolver++"), "flux": ("flow_euler",)}
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # its VAE overflows in fp16
FAMILY = one_of(*SCHEDULERS)
# What `export` writes per family (stylestudy/models/export.py): the LoRA layout ComfyUI and AUTOMATIC1111 load, and
# whether the family has a single-file checkpoint layout (stylestudy/models/single_file.py CHECKPOINTS)
UI_LORA_LAYOUTS = {"sd2": "kohya", "sdxl": "kohya", "sd3": "diffusers", "flux": "diffusers"}
SINGLE_FILE_FAMILIES = ("sd2", "sdxl")
MODEL_SCHEMAS: dict[str, dict[str, Rule]] = {
    "sd2": {"family": FAMILY},
    "sd3": {"family": FAMILY, "weighting_scheme": one_of("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"),
            "logit_mean": NUMBER, "logit_std": POSITIVE_NUMBER, "mode_scale": NON_NEGATIVE_NUMBER,
            "max_sequence_length": POSITIVE_INT},
    "sdxl": {"family": FAMILY, "vae_precision": one_of("fp32", "same")},
}
MODEL_SCHEMAS["flux"] = MODEL_SCHEMAS["sd3"] | {"guidance": NON_NEGATIVE_NUMBER,
                                                "base_quantization": one_of("nf4", "int8", "none")}
FLOW_MATCHING = ("sd3", "flux")


def model_schema(model: Any) -> dict[str, Rule]:
    """The rules of params `model`: those of the family it names (an unknown one fails on `family`)."""
    family = model.get("family") if isinstance(model, dict) else None
    return MODEL_SCHEMAS.get(family, {"family": FAMILY})


SCHEMAS: dict[str, dict[str, Any]] = {
    "shared": {"seed": NON_NEGATIVE_INT, "profile": NON_EMPTY_STRING},
    "fetch": {kind: fetch_schema(kind) for kind in FETCH_KINDS},
    "split": {"fractions": {"train": FRACTION, "val": FRACTION, "test": FRACTION}, "max_bad_fraction": FRACTION,
              "min_image_size": POSITIVE_INT},
    "encode": {"resolution": MULTIPLE_OF_8, "center_crop": BOOL, "random_flip": BOOL, "cache_latents": BOOL,
               "mixed_precision": one_of("no", "fp16", "bf16"), "dataloader_num_workers": NON_NEGATIVE_INT},
    "finetune": {
        "seed": NON_NEGATIVE_INT, "epochs": POSITIVE_INT, "max_train_steps": NON_NEGATIVE_INT,
        "train_batch_size": POSITIVE_INT, "gradient_accumulation_steps": POSITIVE_INT,
        "learning_rate": NON_NEGATIVE_NUMBER,
        "lr_scheduler": one_of("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                               "polynomial"),
        "lr_warmup_steps": NON_NEGATIVE_INT, "optimizer": one_of("adamw8bit", "adamw_fused", "adamw"),
        "adam_beta1": FRACTION, "adam_beta2": FRACTION, "adam_weight_decay": NON_NEGATIVE_NUMBER,
        "adam_epsilon": POSITIVE_NUMBER, "max_grad_norm": POSITIVE_NUMBER, "gradient_checkpointing": BOOL,
        "mixed_precision": one_of("no", "fp16", "bf16"), "use_ema": BOOL, "ema_decay": FRACTION,
        "dataloader_num_workers": NON_NEGATIVE_INT, "checkpoint_every": NON_NEGATIVE_INT,
        "channels_last": BOOL, "compile_unet": BOOL, "method": one_of("full", "lora"), "lora_rank": POSITIVE_INT,
        "lora_alpha": POSITIVE_NUMBER, "snr_gamma": NON_NEGATIVE_NUMBER, "noise_offset": NON_NEGATIVE_NUMBER,
        "caption_dropout": FRACTION, "memory_budget_gb": NON_NEGATIVE_NUMBER,
        "clip_loss": {"weight": NON_NEGATIVE_NUMBER, "kind": one_of("global", "directional"),
                      "max_timestep": POSITIVE_INT, "every": POSITIVE_INT},
        "validate_every": NON_NEGATIVE_INT, "validation_prompt": NON_EMPTY_STRING, "validation_images": POSITIVE_INT,
        "validation_steps": POSITIVE_INT, "lora_half_base": BOOL, "fused_backward": BOOL,
        "weights_dtype": one_of("fp32", "bf16"), "ema_device": one_of("accelerator", "cpu"),
        "launch": {"config_file": NON_EMPTY_STRING, "num_processes": POSITIVE_INT},
    },
    "generate": {
        "prompts": non_empty_list_of(NON_EMPTY_STRING), "images_per_prompt": POSITIVE_INT,
        "style_prompt": NON_EMPTY_STRING, "style_to_generator": BOOL,
        "scheduler": one_of(*dict.fromkeys(sum(SCHEDULERS.values(), ()))), "num_inference_steps": POSITIVE_INT,
        "guidance_scale": NON_NEGATIVE_NUMBER, "resolution": MULTIPLE_OF_8, "batch_size": POSITIVE_INT,
        "dtype": one_of("auto", "fp32", "fp16", "bf16"), "compile": BOOL, "channels_last": BOOL, "fuse_qkv": BOOL,
        "vae_batch_size": POSITIVE_INT, "memory": one_of("none", "sequential", "cpu_offload"),
        "test_captions": NON_NEGATIVE_INT,
    },
    "export": {"lora_layout": one_of("auto", "kohya", "diffusers"), "checkpoint": one_of("auto", "single_file", "none"),
               "checkpoint_dtype": one_of("fp16", "bf16", "fp32"), "date": DATE_TODAY_OR_NONE},
    "embed_real": {"batch_size": POSITIVE_INT},
    "clip_eval": {"style_to_clip": BOOL, "bootstrap_samples": POSITIVE_INT, "permutation_samples": POSITIVE_INT,
                  "kid_subsets": POSITIVE_INT, "kid_subset_size": POSITIVE_INT, "batch_size": POSITIVE_INT},
    "blip_check": {"style_words": non_empty_list_of(NON_EMPTY_STRING), "max_new_tokens": POSITIVE_INT,
                   "batch_size": POSITIVE_INT},
    "report": {"captions_per_model": POSITIVE_INT, "training_examples": NON_NEGATIVE_INT},
    "model": MODEL_SCHEMAS["sd2"],  # load_params checks `model` by the rules of the family it names (model_schema)
}


# ---------------------------------------------------------------------------------------------------- validation

def closest_key(key: str, known: list[str]) -> str:
    """The known key a mistyped one most likely meant: one whose word initials it is (lr: learning_rate), else the
    most similar spelling."""
    initials = [k for k in known if "".join(word[:1] for word in k.split("_")) == key]
    return (initials or difflib.get_close_matches(key, known, n=1, cutoff=0) or known)[0]


def validate(section: dict, schema: dict[str, Any], prefix: str) -> dict:
    """Check every key of a params section against its schema; nested dicts are schemas of sub-sections."""
    if not isinstance(section, dict):
        raise UserError(f"params.yaml: {prefix} must be a mapping; {EDIT_HINT.format(key=prefix)}")
    for key in section:
        if key not in schema:
            known = f"{prefix}.{closest_key(str(key), list(schema))}" if prefix else closest_key(str(key), list(schema))
            raise UserError(f"params.yaml: unknown key {prefix + '.' if prefix else ''}{key} (no stage reads it; "
                            f"closest known key: {known}); remove it or fix its name in conf/ or the -S override")
    for key, check in schema.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in section:
            raise UserError(f"params.yaml: missing key {name}; add it ({EDIT_HINT.format(key=name)})")
        if isinstance(check, dict):
            validate(section[key], check, name)
        elif not check.ok(section[key]):
            raise UserError(
                f"params.yaml: {name} must be {check.what}, got {section[key]!r}; {EDIT_HINT.format(key=name)}"
            )
    return section


def compose_params(out: Path, root: Path, overrides: list[str]) -> None:
    """Write params.yaml as `dvc exp run -S <overrides>` composes it from root/conf (DVC's Hydra integration)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(root / "conf"), None, "config", str(root), overrides)


def load_params(section: str, path: Path = PARAMS_FILE) -> dict:
    """Validate the whole of params.yaml, then return one section of it."""
    if not path.is_file():
        raise UserError(f"{path} not found; run from the repository root")
    params = yaml.safe_load(path.read_text()) or {}
    validate(params, SCHEMAS | {"model": model_schema(params.get("model"))}, "")
    from stylestudy.core import checks  # it reads this module's tables

    checks.check_across_sections(params)
    return params[section]


def load_shared(path: Path = PARAMS_FILE) -> dict:
    """The section every stage reads: the seed and the name of the profile that composed params.yaml."""
    return load_params("shared", path)


def parse_args(doc: str, arguments: dict[str, str | dict]) -> argparse.Namespace:
    """A stage's command line: its module docstring as the help text, one positional argument per entry of
    `arguments` (a help string for a path, or add_argument's keywords)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, spec in arguments.items():
        parser.add_argument(name, **({"type": Path, "help": spec} if isinstance(spec, str) else spec))
    return parser.parse_args()


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage's main(): a UserError becomes one line on stderr and exit code 2 (SKETCH_DEBUG=1 shows the traceback)."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quick_start_and_exit()
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for ours in OUR_LOGGERS:  # libraries' INFO chatter (open_clip logs to root) stays hidden
            logging.getLogger(ours).setLevel(logging.INFO)
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if os.environ.get("SKETCH_DEBUG"):
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def quick_start_and_exit() -> None:
    """Spare a stage process the garbage collector's passes over the millions of long-lived objects that importing
    torch, diffusers and open_clip creates: about 1.5 s while importing (collections run 14x less often) and 1.5 s at
    exit (the last collection skips them), out of 5 to 10 s per stage on the smoke DAG. Reference cycles made while
    training or generating are still collected."""
    gc.set_threshold(10_000, 10, 10)
    atexit.register(gc.freeze)


def require_path(path: Path, what: str) -> Path:
    """Fail with one line when an input path that a stage needs does not exist."""
    if not path.exists():
        raise UserError(f"{path} does not exist: {what}")
    return path
