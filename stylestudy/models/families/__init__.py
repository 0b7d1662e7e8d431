"""The model families, one module each behind `base.Family`, told apart by the pipeline folder's model_index.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stylestudy.core.config import UserError
from stylestudy.models import loading
from stylestudy.models.families import sd2
from stylestudy.models.families.base import Conditioning, Family, FrozenEncoders, NoiseProcess

FAMILIES: dict[str, Family] = {family.pipeline_class: family for family in (sd2.FAMILY,)}
__all__ = ["Conditioning", "Family", "FrozenEncoders", "NoiseProcess", "check_pipeline_folder", "copy_pipeline",
           "family_of_pipeline", "load_pipeline"]


def check_pipeline_folder(path: Path) -> Family:
    """Cheaply check that `path` is a pipeline folder of a known family, with safetensors weights (one-line
    UserError); return its family."""
    loading.require_dir(path, "a diffusion pipeline")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path}: no model_index.json; expected a diffusers pipeline folder")
    name = loading.read_json(index).get("_class_name")
    if name not in FAMILIES:
        known = ", ".join(repr(known) for known in FAMILIES)
        raise UserError(f"{index}: _class_name is {name!r}, expected {known}; give a pipeline folder of a family "
                        "this project trains")
    family = FAMILIES[name]
    family.check_folder(path)
    return family


def load_pipeline(path: Path) -> Any:
    """Load a pipeline folder (safetensors only) with its family's pipeline class, after checking it."""
    return check_pipeline_folder(path).load_pipeline(path)


def copy_pipeline(src: Path, out_dir: Path) -> None:
    """Materialise a canonical pipeline folder (no safety checker, no feature extractor) from `src`."""
    load_pipeline(src).save_pretrained(out_dir, safe_serialization=True)


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline, by its class."""
    return FAMILIES[type(pipe).__name__]
