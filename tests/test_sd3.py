"""The SD3 family: flow matching as diffusers' training_utils define it, the three encoders' conditioning as the
pipeline computes it, the settings params refuse for it, and generation that never holds every component at once."""
from __future__ import annotations

import json
from unittest.mock import MagicMock
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import composed, params_refusal, params_with
from PIL import Image

from stages import generate
from stylestudy.core.config import UserError, load_params
from stylestudy.data import sketches
from stylestudy.data.dataset import read_metadata, write_jsonl
from stylestudy.models import families
from stylestudy.models.families import flow, sd3

pytestmark = pytest.mark.usefixtures("one_thread")



def noise_process(scheme: str) -> flow.FlowMatchNoise:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return flow.FlowMatchNoise(scheduler, flow.FlowMatchSettings(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.8))


def diffusers_sigmas(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Each timestep's sigma as diffusers' SD3 training script finds it: its index in the schedule."""
    index = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return scheduler.sigmas[index].view(-1, 1, 1, 1)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"])
def test_flow_matching_is_diffusers_sd3_recipe(scheme: str) -> None:
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    process = noise_process(scheme)
    clean = torch.randn(6, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    noise, timesteps = process.draw(clean, 0.0)
    torch.manual_seed(7)
    expected_noise = torch.randn_like(clean)
    u = compute_density_for_timestep_sampling(scheme, 6, 0.3, 0.8, 1.29)
    expected_t = process.scheduler.timesteps[(u * 1000).long()]
    torch.testing.assert_close(noise, expected_noise)
    torch.testing.assert_close(timesteps, expected_t)
    sigma = diffusers_sigmas(process.scheduler, timesteps)
    noisy = process.noised(clean, noise, timesteps)
    torch.testing.assert_close(noisy, (1 - sigma) * clean + sigma * noise)
    torch.testing.assert_close(process.target(clean, noise, timesteps), noise - clean)
    torch.testing.assert_close(process.predicted_x0(noisy, noise - clean, timesteps), clean, atol=1e-5, rtol=1e-5)
    weights = process.loss_weights(timesteps, 0.0)
    if scheme in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(weights, compute_loss_weighting_for_sd3(scheme, sigma.flatten()))
    else:
        assert weights is None  # all ones: the plain mean


def test_logit_normal_draws_middle_noise_levels_more_than_uniform() -> None:
    torch.manual_seed(0)
    clean = torch.zeros(4000, 1, 1, 1)
    middle = {scheme: ((lambda t: ((t > 250) & (t < 750)).float().mean())(noise_process(scheme).draw(clean, 0)[1]))
              for scheme in ("logit_normal", "uniform")}
    assert middle["logit_normal"] > middle["uniform"] + 0.1


def test_latents_are_shifted_then_scaled() -> None:
    config = type("VaeConfig", (), {"shift_factor": 0.0609, "scaling_factor": 1.5305})()
    sample = torch.randn(2, 16, 4, 4)
    latents = sd3.FAMILY.to_latents(config, sample)
    torch.testing.assert_close(latents, (sample - 0.0609) * 1.5305)
    torch.testing.assert_close(sd3.FAMILY.from_latents(config, latents), sample)


def test_conditioning_is_the_pipeline_s_own(sd3_dir: Path) -> None:
    family = sd3.FAMILY.configured({"family": "sd3", "weighting_scheme": "logit_normal", "logit_mean": 0.0,
                                    "logit_std": 1.0, "mode_scale": 1.29, "max_sequence_length": 12})
    encoders = family.load_encoders(sd3_dir, torch.device("cpu"), torch.float32)
    texts = ["a horse near a tree", "zebra running"]
    conditioning = encoders.encode_text(texts)
    pipe = families.load_pipeline(sd3_dir)
    embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=12)
    assert conditioning.sequence.shape == (2, 77 + 12, 64) and conditioning.pooled.shape == (2, 64)
    torch.testing.assert_close(conditioning.sequence, embeds)
    torch.testing.assert_close(conditioning.pooled, pooled)
    assert family.count_truncated(encoders, ["a " * 20, "a horse"]) == 1  # 20 T5 tokens and </s> exceed 12


@pytest.mark.parametrize("override, words", [
    ("finetune.snr_gamma=5", "no meaning for flow matching"),
    ("generate.scheduler=pndm", "not a sampler of model family sd3"),
    ("model.weighting_scheme=lognorm", "model.weighting_scheme must be one of"),
])
def test_settings_sd3_cannot_honour_are_refused_in_one_line(tmp_path: Path, override: str, words: str) -> None:
    assert words in params_refusal(tmp_path, "finetune", "model=sd3", override)


def test_sd2_params_have_no_sd3_keys(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown key model.max_sequence_length"):
        load_params("model", params_with(tmp_path, "+model.max_sequence_length=77"))
    assert load_params("model", params_with(tmp_path, "model=sd3", "profile=smoke"))["family"] == "sd3"


@pytest.mark.parametrize("repo_id, status", [("stabilityai/stable-diffusion-3-medium-diffusers", 401),
                                             ("black-forest-labs/FLUX.1-dev", 403)])
def test_gated_model_without_a_token_or_licence_is_one_line(monkeypatch: pytest.MonkeyPatch, repo_id: str,
                                                           status: int) -> None:
    """SD3's and FLUX.1-dev's gates: 401 without a token, 403 with one whose licence was not accepted."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    from stylestudy.models import hub

    def gated(*args, **kwargs):
        raise GatedRepoError(f"{status} Client Error: access to model is restricted",
                             response=MagicMock(status_code=status))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.setattr(hub, "reachable", lambda: None)
    with pytest.raises(UserError) as refused:
        hub.download("sd", repo_id, "main")
    message = str(refused.value)
    assert f"{repo_id} is gated" in message and "accept its licence" in message
    assert "HF_TOKEN" in message and "\n" not in message


def generate_params(memory: str) -> dict:
    return composed("profile=smoke", "model=sd3")["generate"] | {
        "memory": memory, "images_per_prompt": 1, "prompts": ["a horse", "zebra running", "a tree"], "batch_size": 2}


def test_sequential_generation_gives_the_same_images(sd3_dir: Path, tmp_path: Path) -> None:
    split = tmp_path / "split"
    sketches.make_synthetic_sketches(tmp_path / "raw", 2, 32, 0)
    write_jsonl(split / "test.jsonl", read_metadata(tmp_path / "raw"))
    images = {}
    for memory in ("none", "sequential"):
        rows = generate.run("base", sd3_dir, split, tmp_path / memory, generate_params(memory), 0, sd3.FAMILY)
        assert [row["memory"] for row in rows] == [memory] * len(rows)
        images[memory] = np.stack([np.asarray(Image.open(tmp_path / memory / row["file_name"])) for row in rows])
        manifest = [json.loads(line) for line in (tmp_path / memory / "manifest.jsonl").read_text().splitlines()]
        assert len(manifest) == 3 + 2  # the study's prompts, then the held-out captions
    assert np.array_equal(images["none"], images["sequential"])


def t5_wo_dtypes(t5: torch.nn.Module) -> set[torch.dtype]:
    return {w.dtype for name, w in t5.named_parameters() if ".wo." in name}


def test_t5_keeps_its_fp32_projections_in_fp16(sd3_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 29 defect 4: T5 v1.1 overflows in fp16 in its `wo` projections, which transformers keeps in fp32 when it
    loads in fp16; a plain `.to(dtype=fp16)` (the encoders for encode and finetune, the pipeline for generate) cast
    them too. Both now keep them, and the rest runs in fp16."""
    from stylestudy.models import loading

    encoders = sd3.FAMILY.load_encoders(sd3_dir, torch.device("cpu"), torch.float16)
    t5 = encoders.text_encoders[2]
    assert t5_wo_dtypes(t5) == {torch.float32} and t5.shared.weight.dtype == torch.float16
    assert torch.isfinite(encoders.encode_text(["a horse"]).sequence).all()
    monkeypatch.setattr(loading, "default_dtype", lambda device: torch.float16)
    p = generate_params("none") | {"dtype": "auto"}
    pipe = generate.load_pipeline(sd3_dir, p, sd3.FAMILY)
    assert t5_wo_dtypes(pipe.text_encoder_3) == {torch.float32} and pipe.transformer.dtype == torch.float16


# ------------------------------------------------------------------------------------------------ SD3.5


SPEEDS_OFF = {"compile": False, "channels_last": False, "fuse_qkv": False, "vae_batch_size": 8, "memory": "none"}
SPEEDS_ON = {"compile": False, "channels_last": True, "fuse_qkv": True, "vae_batch_size": 1, "memory": "sequential"}


def render_sd35(sd35_dir: Path, out: Path, speeds: dict) -> np.ndarray:
    p = composed("profile=smoke", "model=sd35")["generate"] | speeds | {
        "images_per_prompt": 1, "prompts": ["a horse", "zebra running", "a tree"], "batch_size": 2, "test_captions": 0}
    rows = generate.run("base", sd35_dir, out / "split", out / "samples", p, 0, sd3.FAMILY)
    return np.stack([np.asarray(Image.open(out / "samples" / row["file_name"]), dtype=np.int16) for row in rows])


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sd35_generates_through_the_generate_stage_with_every_speed_option(sd35_dir: Path, tmp_path: Path,
                                                                          compiled: bool) -> None:
    """SD3.5's transformer (query-key RMS norm, dual attention in block 0) renders with every speed setting on, the
    images of the plain run within float rounding. Before the fix, fuse_qkv set diffusers' fused joint attention, which
    crashed in the dual-attention block (no text stream); fusing the other blocks only would skip their query-key norm
    (measured on this tiny transformer: outputs 0.08 apart), other images. The compiled variant costs ~20 s: slow tier."""
    transformer = json.loads((sd35_dir / "transformer" / "config.json").read_text())
    assert transformer["qk_norm"] == "rms_norm" and transformer["dual_attention_layers"] == [0]
    plain = render_sd35(sd35_dir, tmp_path / "plain", SPEEDS_OFF)
    fast = render_sd35(sd35_dir, tmp_path / "fast", SPEEDS_ON | {"compile": compiled})
    assert plain.shape == (3, 32, 32, 3) and plain.std() > 0
    assert np.abs(fast - plain).max() <= 1  # 8-bit pixels


def test_a_variant_of_another_family_is_refused_in_one_line(tmp_path: Path) -> None:
    assert "fetch.sd.variant 'sd35' is not a model of family sd2" in params_refusal(tmp_path, "fetch",
                                                                                    "fetch.sd.variant=sd35")
    assert load_params("fetch", params_with(tmp_path, "model=sd35", "profile=smoke"))["sd"]["variant"] == "sd35"
