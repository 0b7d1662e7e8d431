"""The only code in the project that talks to the Hugging Face Hub: a quick reachability check, then a snapshot.

Without the check, huggingface_hub retries a host it cannot resolve five times (about 25 s of log lines) before the
one-line error; with it, an unreachable Hub falls back at once to the local Hugging Face cache, as HF_HUB_OFFLINE=1
does, and fails with one line that says how to run offline.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from urllib.parse import urlparse

from stylestudy.core.config import UserError

FILES = {
    # the diffusers folders only (SD3's and FLUX's repositories also hold single-file checkpoints at their root); T5's
    # sentencepiece model (*.model) and its sharded weights (model-0000k-of-0000n), FLUX's sharded transformer
    "sd": ["*.json", "*.txt", "*/*.model", "*/diffusion_pytorch_model*.safetensors", "text_encoder*/model*.safetensors"],
    "clip": ["open_clip_config.json", "open_clip_model.safetensors"],
    "blip": ["*.json", "*.txt", "model.safetensors"],
    "guide": ["open_clip_config.json", "open_clip_model.safetensors"],
    "data": ["*.parquet"],
    # what the text-to-image pipeline loads (no image_encoder weights); text_unet: its attention is swapped in
    "csd": ["pytorch_model.bin"],  # the published pickle: stylestudy/models/csd.py converts it, loading it safely
    "vd": ["*.json", "*.txt", "image_unet/*.safetensors", "text_unet/*.safetensors", "vae/*.safetensors",
           "text_encoder/*.safetensors"],
}
OFFLINE_HINT = ("to run offline, use `make demo` (the smoke setting) or set fetch.{kind}.source=local with "
                "fetch.{kind}.path=<folder>")


def reachable(timeout: float = 5.0) -> str | None:
    """None when the Hub endpoint accepts a connection, else why not (one line)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as error:
        return f"{url.hostname}: {error.strerror or error}"
    return None


def download(kind: str, repo_id: str, revision: str) -> Path:
    """A Hub snapshot folder; from the local Hugging Face cache when the Hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry lines repeat what the error says
    repo_type = "dataset" if kind == "data" else "model"
    offline = reachable()
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=FILES[kind],
                                   local_files_only=offline is not None)
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated on the Hub: accept its licence at https://huggingface.co/{repo_id} with "
                        "your account, then export HF_TOKEN=<a read token of that account> and run again") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        reason = f"not in the local Hugging Face cache, and the Hub cannot be used: {offline}" if offline else (
            str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise UserError(f"cannot get {repo_type} {repo_id}@{revision} ({reason}); check the network or HF_TOKEN; "
                        + OFFLINE_HINT.format(kind=kind)) from None
    return Path(folder)
