"""The pooled text embedding (SDXL, FLUX) and SDXL's time ids reach the denoiser: from the encode stage's files, through
the cached training batches, to the family's denoise, the denoiser's output moves when only the cached pooled
embeddings (each caption given another's) or only the cached crop records (the original size doubled) change, and not
at all when nothing changes.

The learning checks cannot see a pooled embedding or time ids lost on the way: a tiny model memorises two captions
without them (tests/test_learning_sdxl.py, test_learning_flux.py). The tiny denoisers' outputs do depend on them, so a
unit test can. Measured (relative change of the output, batch of 2 at 32 px, the tiny folders with unshaped VAE and
transformer): SDXL pooled 0.0226, time ids 0.0284; FLUX pooled 0.1128 (on its NF4 base). Broken once each in the
family code: SDXL's denoise given zero text_embeds, pooled 0.0000 (fails); zero time_ids, time ids 0.0000 (fails);
FLUX's transformer_kwargs given zero pooled_projections, pooled 0.0000 (fails). A pooled embedding dropped from the
encoding (Conditioning.tensors() not storing it) fails every case: both denoisers raise without it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import composed

from stages import encode
from stylestudy.data import dataset, latents, sketches
from stylestudy.models import families
from stylestudy.train import batches

RESOLUTION = 32
ENCODING = {"resolution": RESOLUTION, "center_crop": True, "random_flip": False, "cache_latents": True,
            "mixed_precision": "no", "dataloader_num_workers": 0}
AT_LEAST = 2e-3  # relative change of the output; measured an order of magnitude above (the docstring)
CHANGES = {  # (file, tensor) of the encoding, and the change
    "pooled": (latents.TEXT_FILE, "pooled", lambda pooled: pooled.roll(1, dims=0)),
    "time_ids": (latents.LATENTS_FILE, "crop", lambda crop: torch.cat([crop[..., :2] * 2, crop[..., 2:]], -1)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def encoded(folder: Path, name: str, root: Path) -> tuple:
    """The family of `name` in the smoke profile, two sketches and their split, and the encode stage's folder."""
    family = families.from_params(composed("profile=smoke", f"model={name}")["model"])
    sketches.make_synthetic_sketches(root / "raw", 2, RESOLUTION, 0)
    rows = dataset.read_metadata(root / "raw")
    dataset.write_jsonl(root / "split" / "train.jsonl", rows)
    settings = latents.EncodeSettings(**ENCODING)
    encode.run(folder, root / "raw", root / "split", root / "latents", settings, family)
    return family, rows, settings


@pytest.fixture(scope="module")
def encodings(tmp_path_factory: pytest.TempPathFactory, request):
    """encoded(...) of a family's tiny folder, once a module: (folder, root, family, rows, settings)."""
    made: dict[str, tuple] = {}

    def of(name: str) -> tuple:
        if name not in made:
            folder, root = request.getfixturevalue(f"{name}_dir"), tmp_path_factory.mktemp(name)
            made[name] = (folder, root, *encoded(folder, name, root))
        return made[name]

    return of


def changed(encoding: Path, out: Path, change: str | None) -> Path:
    """A copy of the encoding folder with one tensor changed (CHANGES), or none."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(encoding, out)
    if change is not None:
        file, key, how = CHANGES[change]
        tensors = load_file(str(out / file))
        save_file(tensors | {key: how(tensors[key]).contiguous()}, str(out / file))
    return out


def denoised(folder: Path, root: Path, family, rows: list[dict], settings, encoding: Path) -> torch.Tensor:
    """The denoiser's output on the training batch of both sketches as finetune builds it from `encoding`, at noise
    and timesteps drawn from a fixed seed."""
    encoders = family.load_encoders(folder, torch.device("cpu"), torch.float32)
    data = batches.training_data(root / "raw", rows, encoders, settings, 0.0, encoding, folder, show_progress=False)
    denoiser, noise = family.load_denoiser(folder), family.load_noise_process(folder)
    torch.manual_seed(0)
    inputs = data.to_inputs(data.collate([(i, data.items[i]) for i in range(len(rows))]))
    eps, timesteps = noise.draw(inputs.latents, 0.0)
    with torch.no_grad():
        return family.denoise(denoiser, noise.noised(inputs.latents, eps, timesteps), timesteps, inputs.conditioning)


@pytest.mark.parametrize("name, change", [("sdxl", "pooled"), ("sdxl", "time_ids"), ("flux", "pooled")])
def test_the_cached_conditioning_reaches_the_denoiser(name: str, change: str, encodings, tmp_path: Path) -> None:
    folder, root, family, rows, settings = encodings(name)
    outputs = {what: denoised(folder, root, family, rows, settings,
                              changed(root / "latents", tmp_path / f"latents-{what}", what or None))
               for what in ("", change)}
    same = denoised(folder, root, family, rows, settings, root / "latents")
    assert torch.equal(same, outputs[""])  # nothing else moves it: the same inputs give the very same output
    moved = float((outputs[change] - outputs[""]).norm() / outputs[""].norm())
    print(f"{name} {change}: the output moved by {moved:.4f} of its norm")
    assert moved > AT_LEAST, f"{name}: changing only the cached {change} moved the output by {moved:.2e}"
