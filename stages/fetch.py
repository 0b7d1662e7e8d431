"""fetch: materialise one input of the study on disk, in its ecosystem's own format, with a manifest.

Reads params `fetch.<kind>` and `shared` (and `model` for sd). Writes OUT_DIR, one of:
  sd    a diffusers pipeline folder of params model.family (safetensors): StableDiffusionPipeline (sd2) or
        StableDiffusion3Pipeline (sd3; SD3.5 too), StableDiffusionXLPipeline (sdxl) or FluxPipeline (flux); random
        sources take fetch.sd.variant's shapes
  clip  an open_clip `local-dir:` folder (open_clip_config.json + open_clip_model.safetensors)
  blip  a transformers BLIP captioning folder (safetensors)
  guide an open_clip folder: the CLIP that finetune.clip_loss trains against (never the scoring one)
  data  an imagefolder: images + metadata.jsonl (file_name, text)
  vd    Versatile Diffusion's text-to-image pipeline folder, a baseline generator (stylestudy/models/families/vd.py);
        with fetch.vd.enabled false (the default) nothing but the manifest, which says it is off
  csd   the CSD style embedder (stylestudy/models/csd.py): config.json + model.safetensors, converted from the
        published pickle (loaded weights-only)
and OUT_DIR/fetch_manifest.json (source, revision, resolved commit, sha256 of every file).

Sources: `hub` (repo_id at revision; the only code in the project that talks to a hub), `local` (a folder: a model
folder, an imagefolder or a folder of parquet shards), `tiny` (small random models), `full` (the study's architectures,
random weights: study-shaped speed and memory without the Hub) or `synthetic` (generated sketches).
A local dataset folder is a DVC dependency of `fetch@data` (dvc.yaml): adding, removing or editing a file in it
fetches again, and DVC's run-cache restores a folder fetched before with the same inputs instead of fetching it again.

Run: python -m stages.fetch KIND OUT_DIR (params.yaml is validated whole before any work)
Example: python -m stages.fetch data data/raw
"""
from __future__ import annotations

import logging
from pathlib import Path

from stylestudy.models import builders, builders_flux, builders_sd3, builders_sdxl, builders_vd, csd, families, hub
from stylestudy.models import loading
from stylestudy.models.families import Family, vd
from stylestudy.data import imagefolder, sketches
from stylestudy.core.config import (
    FETCH_KINDS, NON_EMPTY_STRING, RANDOM_SOURCES, UserError, cli, load_params, load_shared, parse_args,
)
from stylestudy.core.outputs import MANIFEST, atomic_dir, file_hashes, library_versions, write_json

log = logging.getLogger(__name__)

OPTIONAL = ("vd",)  # inputs present only when fetch.<kind>.enabled: the stage still runs (DVC needs the output)
OFFLINE_SOURCE = {"sd": "tiny", "clip": "tiny", "blip": "tiny", "guide": "tiny", "data": "synthetic", "vd": "tiny",
                  "csd": "tiny"}


def check_source(kind: str, p: dict) -> None:
    """Fail fast, before any download or build, on a source that cannot work."""
    if p["source"] == "hub":
        for key in ("repo_id", "revision"):
            if not NON_EMPTY_STRING.ok(p[key]):
                raise UserError(f"params.yaml: fetch.{kind}.{key} must be set for source: hub")
    if p["source"] == "local":
        if not p["path"]:
            raise UserError(f"params.yaml: fetch.{kind}.path must name a folder for source: local")
        if not Path(p["path"]).exists():
            raise UserError(f"fetch.{kind}.path: {p['path']} does not exist; point it at a local {kind} folder")


COPIERS = {"clip": loading.copy_clip, "blip": loading.copy_blip, "guide": loading.copy_clip,
           "data": imagefolder.copy_dataset, "vd": vd.convert, "csd": csd.convert}
SD_BUILDERS = {"sd2": builders.save_random_sd, "sd3": builders_sd3.save_random_sd3,
               "sdxl": builders_sdxl.save_random_sdxl, "flux": builders_flux.save_random_flux}
BUILDERS = {"clip": builders.save_random_clip, "blip": builders.save_random_blip,
            "guide": builders.save_random_guide, "vd": builders_vd.save_random_vd, "csd": csd.save_random}


def random_arch(kind: str, p: dict) -> str:
    """The architecture a random source builds: its size, and for the pipeline the variant (fetch.sd.variant)."""
    return f"{p['source']}-{p['variant']}" if kind == "sd" and p["variant"] != "default" else p["source"]


def requested(kind: str, p: dict, seed: int) -> dict:
    """What the manifest records about the source before anything is fetched."""
    origin = {"kind": kind, "source": p["source"]}
    if p["source"] in RANDOM_SOURCES:
        return origin | {"seed": seed} | ({"arch": random_arch(kind, p)} if kind == "sd" else {})
    if p["source"] == "synthetic":
        return origin | {"seed": seed, "n_images": p["n_images"], "image_size": p["image_size"]}
    if p["source"] == "local":
        return origin | {"path": str(Path(p["path"]).resolve())}
    return origin | {"repo_id": p["repo_id"], "revision": p["revision"]}


def copy(kind: str, src: Path, out: Path, family: Family) -> None:
    """Copy a local or downloaded input into its canonical folder; a pipeline must be of params model.family."""
    if kind == "sd":
        families.copy_pipeline(src, out, family)
    else:
        COPIERS[kind](src, out)


def materialise(kind: str, p: dict, seed: int, out: Path, family: Family) -> dict:
    """Fill `out` from the configured source; return what the manifest adds (Hub commit, parameter counts)."""
    if p["source"] in RANDOM_SOURCES:
        build = SD_BUILDERS[family.name] if kind == "sd" else BUILDERS[kind]
        return {"parameters": build(out, seed, arch=random_arch(kind, p))}
    if p["source"] == "synthetic":
        sketches.make_synthetic_sketches(out, p["n_images"], p["image_size"], seed)
    elif p["source"] == "local":
        copy(kind, Path(p["path"]), out, family)
    else:
        snapshot = hub.download(kind, p["repo_id"], p["revision"])
        copy(kind, snapshot, out, family)
        return {"resolved_commit": snapshot.name}
    return {}


def run(kind: str, p: dict, seed: int, out: Path, family: Family = families.FAMILIES["sd2"]) -> None:
    """Materialise one input into `out`, whole or not at all; the pipeline (`sd`) of `family`."""
    switched_off = kind in OPTIONAL and not p["enabled"]
    if not switched_off:
        check_source(kind, p)
    origin = requested(kind, p, seed) | ({"family": family.name} if kind == "sd" else {})
    origin |= {"enabled": not switched_off} if kind in OPTIONAL else {}
    log.info("fetch %s from %s into %s%s", kind, p["source"], out, " (switched off)" if switched_off else "")
    with atomic_dir(out) as tmp:
        if not switched_off:
            origin |= materialise(kind, p, seed, tmp, family)
        manifest = origin | {"libraries": library_versions(), "files": file_hashes(tmp)}
        write_json(tmp / MANIFEST, manifest)
    log.info("fetch %s: %d files", kind, len(manifest["files"]))


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "kind": {"choices": FETCH_KINDS,
                 "help": "which input: the SD pipeline, the CLIP scorer, BLIP, the guidance CLIP, the dataset, VD or CSD"},
        "out": "the folder to materialise it in (models/pretrained/<kind> or data/raw)",
    })
    p, shared = load_params("fetch")[args.kind], load_shared()
    loading.require_gpu(shared["profile"])
    family = families.from_params(load_params("model")) if args.kind == "sd" else families.FAMILIES["sd2"]
    run(args.kind, p, shared["seed"], args.out, family)


if __name__ == "__main__":
    main()
