"""The model families, one module each behind `base.Family`: chosen by params `model.family`, recognised in a pipeline
folder by its model_index.json. Baselines (Versatile Diffusion) are generators only, recognised the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stylestudy.core.config import UserError
from stylestudy.core.outputs import MANIFEST
from stylestudy.models import loading
from stylestudy.models.families import flux, sd2, sd3, sdxl, vd
from stylestudy.models.families.base import Conditioning, Family, FrozenEncoders, Generator, NoiseProcess

FAMILIES: dict[str, Family] = {family.name: family for family in (sd2.FAMILY, sd3.FAMILY, sdxl.FAMILY, flux.FAMILY)}
BASELINES: dict[str, Generator] = {vd.GENERATOR.name: vd.GENERATOR}
__all__ = ["BASELINES", "Conditioning", "Family", "FrozenEncoders", "Generator", "NoiseProcess",
           "check_pipeline_folder", "copy_pipeline", "family_of_pipeline", "from_params", "generator_for",
           "load_pipeline", "switched_off"]


def from_params(model: dict) -> Family:
    """The family params `model` names, with its settings."""
    return FAMILIES[model["family"]].configured(model)


def check_pipeline_folder(path: Path, expected: Family | None = None) -> Family:
    """Cheaply check that `path` is a pipeline folder of a known family (of `expected`'s when given), with safetensors
    weights (one-line UserError); return its family (`expected` itself when given)."""
    loading.require_dir(path, "a diffusion pipeline")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path}: no model_index.json; expected a diffusers pipeline folder")
    name = loading.read_json(index).get("_class_name")
    by_class = {family.pipeline_class: family for family in FAMILIES.values()}
    for kin in FAMILIES.values():
        if name in kin.look_alikes:
            wanted = expected or kin
            raise UserError(f"{index}: {kin.look_alikes[name]} ({name}), which this project cannot train; params "
                            f"model.family is {wanted.name}: give a {wanted.pipeline_class} folder")
    if name not in by_class:
        known = ", ".join(repr(known) for known in by_class)
        raise UserError(f"{index}: _class_name is {name!r}, expected {known}; give a pipeline folder of a family "
                        "this project trains")
    found = by_class[name]
    if expected is not None and found.name != expected.name:
        raise UserError(f"{index}: a {name} (model family {found.name}), but params model.family is {expected.name}; "
                        f"run with -S model={found.name}, or fetch a {expected.name} pipeline (dvc repro fetch@sd)")
    family = expected or found
    family.check_folder(path)
    return family


def load_pipeline(path: Path) -> Any:
    """Load a pipeline folder (safetensors only) with its family's pipeline class, after checking it."""
    return check_pipeline_folder(path).load_pipeline(path)


def copy_pipeline(src: Path, out_dir: Path, expected: Family | None = None) -> None:
    """Materialise a canonical pipeline folder (no safety checker, no feature extractor) from `src`, which must be of
    the `expected` family when given."""
    family = check_pipeline_folder(src, expected)
    family.load_pipeline(src).save_pretrained(out_dir, safe_serialization=True)


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline, by its class (default settings)."""
    return {family.pipeline_class: family for family in FAMILIES.values()}[type(pipe).__name__]


def switched_off(path: Path) -> bool:
    """Whether `path` is an optional model that fetch left out (its manifest says enabled: false, no pipeline)."""
    manifest = path / MANIFEST
    return (manifest.is_file() and not (path / "model_index.json").exists()
            and loading.read_json(manifest).get("enabled") is False)


def generator_for(path: Path, family: Family | None) -> Generator:
    """The generator of a pipeline folder: a baseline's when model_index.json names its class (checked), else
    `family`'s (check_pipeline_folder)."""
    index = path / "model_index.json"
    name = loading.read_json(index).get("_class_name") if index.is_file() else None
    for baseline in BASELINES.values():
        if name == baseline.pipeline_class:
            baseline.check_folder(path)
            return baseline
    return check_pipeline_folder(path, family)
