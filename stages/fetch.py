"""fetch: materialise one input of the study on disk, in its ecosystem's own format, with a manifest.

Reads params `fetch.<kind>` and `shared`. Writes OUT_DIR, one of:
  sd    a diffusers StableDiffusionPipeline folder (safetensors)
  clip  an open_clip `local-dir:` folder (open_clip_config.json + open_clip_model.safetensors)
  blip  a transformers BLIP captioning folder (safetensors)
  data  an imagefolder: images + metadata.jsonl (file_name, text)
and OUT_DIR/fetch_manifest.json (source, revision, resolved commit, sha256 of every file).

Sources: `hub` (repo_id at revision; the only code in the project that talks to a hub), `local` (a folder: a model
folder, an imagefolder or a folder of parquet shards), `tiny` (small random models), `full` (the study's architectures,
random weights: study-shaped speed and memory without the Hub) or `synthetic` (generated sketches).
An OUT_DIR already fetched from the same fixed source (tiny, full, synthetic, or a Hub commit) is reused when every file
still has the sha256 its manifest records; otherwise the file that differs is named and the input is fetched again.

Run: python -m stages.fetch KIND OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

from stages import builders, data, models, sketches
from stages.config import (
    NON_EMPTY_STRING, POSITIVE_INT, STRING, Rule, UserError, cli, load_params, load_shared, one_of,
)
from stages.outputs import MANIFEST, atomic_dir, file_hashes, library_versions, sha256_of, write_json

log = logging.getLogger(__name__)

COMMIT = re.compile(r"[0-9a-f]{40}")

KINDS = ("sd", "clip", "blip", "data")
OFFLINE_SOURCE = {"sd": "tiny", "clip": "tiny", "blip": "tiny", "data": "synthetic"}
RANDOM_SOURCES = ("tiny", "full")  # random weights built from configs: the smoke size and the study's size
HUB_FILES = {
    "sd": ["*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"],
    "clip": ["open_clip_config.json", "open_clip_model.safetensors"],
    "blip": ["*.json", "*.txt", "model.safetensors"],
    "data": ["*.parquet"],
}


def schema(kind: str) -> dict[str, Rule]:
    rules = {
        "source": one_of("hub", "local", "synthetic") if kind == "data" else one_of("hub", "local", *RANDOM_SOURCES),
        "repo_id": STRING,
        "revision": STRING,
        "path": STRING,
    }
    if kind == "data":
        rules |= {"n_images": POSITIVE_INT, "image_size": POSITIVE_INT}
    return rules


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


def download(kind: str, repo_id: str, revision: str) -> Path:
    """A Hub snapshot folder (from the local Hugging Face cache when it is there or HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_type = "dataset" if kind == "data" else "model"
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=HUB_FILES[kind])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot get {repo_type} {repo_id}@{revision} from the Hub ({first_line}); "
                        f"check the network or HF_TOKEN, or set fetch.{kind}.source to local") from None
    return Path(folder)


def copy_dataset(src: Path, out: Path) -> None:
    """An imagefolder (metadata.jsonl) is copied as it is; parquet shards are converted to one."""
    if (src / "metadata.jsonl").is_file():
        shutil.copytree(src, out, dirs_exist_ok=True)
        return
    shards = sorted(src.rglob("*.parquet"))
    if not shards:
        raise UserError(f"{src}: no metadata.jsonl and no .parquet files; give an imagefolder or parquet shards")
    data.parquet_to_imagefolder(shards, out)


COPIERS = {"sd": models.copy_sd, "clip": models.copy_clip, "blip": models.copy_blip, "data": copy_dataset}
BUILDERS = {"sd": builders.save_random_sd, "clip": builders.save_random_clip, "blip": builders.save_random_blip}


def requested(kind: str, p: dict, seed: int) -> dict:
    """What the manifest records about the source before anything is fetched."""
    origin = {"kind": kind, "source": p["source"]}
    if p["source"] in RANDOM_SOURCES:
        return origin | {"seed": seed}
    if p["source"] == "synthetic":
        return origin | {"seed": seed, "n_images": p["n_images"], "image_size": p["image_size"]}
    if p["source"] == "local":
        return origin | {"path": str(Path(p["path"]).resolve())}
    return origin | {"repo_id": p["repo_id"], "revision": p["revision"]}


def materialise(kind: str, p: dict, seed: int, out: Path) -> dict:
    """Fill `out` from the configured source; return what the manifest adds (Hub commit, parameter counts)."""
    if p["source"] in RANDOM_SOURCES:
        return {"parameters": BUILDERS[kind](out, seed, arch=p["source"])}
    if p["source"] == "synthetic":
        sketches.make_synthetic_sketches(out, p["n_images"], p["image_size"], seed)
    elif p["source"] == "local":
        COPIERS[kind](Path(p["path"]), out)
    else:
        snapshot = download(kind, p["repo_id"], p["revision"])
        COPIERS[kind](snapshot, out)
        return {"resolved_commit": snapshot.name}
    return {}


def reusable(out: Path, origin: dict) -> bool:
    """True when `out` was fetched from this very source and every file still has the hash its manifest records.

    A local folder or a Hub branch can change behind the same name, so only fixed sources are reused.
    """
    manifest_path = out / MANIFEST
    fixed = origin["source"] in (*RANDOM_SOURCES, "synthetic") or COMMIT.fullmatch(origin.get("revision", ""))
    if not (fixed and manifest_path.is_file()):
        return False
    manifest = json.loads(manifest_path.read_text())
    if {key: manifest.get(key) for key in origin} != origin:
        return False
    on_disk = {str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()} - {MANIFEST}
    for name in sorted(on_disk | set(manifest["files"])):
        if name not in manifest["files"] or name not in on_disk or sha256_of(out / name) != manifest["files"][name]:
            log.warning("%s differs from %s (added, removed or changed); fetching again", out / name, MANIFEST)
            return False
    return True


def run(kind: str, p: dict, seed: int, out: Path) -> None:
    """Materialise one input into `out`, whole or not at all; reuse what is there when its hashes verify."""
    check_source(kind, p)
    origin = requested(kind, p, seed)
    if reusable(out, origin):
        log.info("fetch %s: %s already holds it and its hashes verify; reusing it", kind, out)
        return
    log.info("fetch %s from %s into %s", kind, p["source"], out)
    with atomic_dir(out) as tmp:
        origin |= materialise(kind, p, seed, tmp)
        manifest = origin | {"libraries": library_versions(), "files": file_hashes(tmp)}
        write_json(tmp / MANIFEST, manifest)
    log.info("fetch %s: %d files", kind, len(manifest["files"]))


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    p = load_params("fetch", {args.kind: schema(args.kind)})[args.kind]
    run(args.kind, p, load_shared()["seed"], args.out)


if __name__ == "__main__":
    main()
