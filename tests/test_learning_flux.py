"""The learning check for the FLUX family: a LoRA trained on the NF4 base of the tiny FLUX pipeline generates the image.

As tests/test_learning_sd3.py does for SD3: finetune.run trains the smoke setting's tiny FLUX pipeline (flow matching
on packed latents, the guidance embedding, a LoRA on the 4-bit NF4 base: the study's QLoRA path, on this CPU) on one
synthetic sketch and its caption until it has memorised it; FluxPipeline then generates from the caption (fixed seed,
10 Euler steps, output_type="latent"), and the latent must lie much closer to the sketch's latent than what the
untouched pipeline generates. The adapter, loaded by diffusers' own `load_lora_weights` on the base FluxPipeline (in
full precision), must give the images of the stage's fused folder (the unquantised base with the adapter merged).

Measured (2026-12-07, this 2-core CPU, one thread): base 1.634 -> fine-tuned 0.651 from the sketch's latent (ratio
2.51; the target latent's RMS 1.414: shifted by one standard deviation, see learning_checks.make_memorisable); the loaded adapter and
the fused folder agree within 1e-4. Each break in the FLUX training code, made once locally in a copy: the target's sign
flipped (noise - x0 -> x0 - noise, in the shared FlowMatchNoise) 2.321 -> 2.417 (ratio 0.96, fails); the latents not
shifted before scaling 1.634 -> 1.234 (ratio 1.32, fails; with the tiny VAE's own shift of 0.1159 this break passed
unseen, 0.474 against 0.475 unbroken, hence the larger shift here); the guidance embedding given 1000 x its value
1.506 -> 0.871 (ratio 1.73, fails). Zeroing the pooled CLIP embedding in training passed (ratio 2.74 against 2.60
unbroken, before the shift change): the tiny model barely uses it, and the unit test
tests/test_flux.py::test_sampling_is_the_pipeline_s_denoising is what pins the conditioning to FluxPipeline's
(tests/test_conditioning_path.py fails on that break: the cached pooled embedding no longer moves the output). A
random tiny transformer could not be taught by a LoRA at all (ratio 1.28 after 300 steps): the tiny pipeline's
transformer is shaped at build (builders_flux.shape_transformer).

What makes memorising possible in a few hundred CPU steps, as for SD2 and SD3: a near-deterministic VAE posterior and
a scaling factor that gives the shifted latents unit variance (vae_shaping).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from learning_checks import TRAINING, assert_draws_closer, assert_the_adapter_gives_the_fused_images, finetune, prepare

from stylestudy.models import builders_flux

COPIES = 4  # the sketch four times in every batch: four noise draws per step, a steadier gradient
LORA = {"method": "lora", "lora_rank": 16, "lora_alpha": 16, "max_train_steps": 300, "learning_rate": 1e-2,
        "train_batch_size": COPIES, "gradient_checkpointing": True, "use_ema": False}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    prepared = prepare(tmp_path_factory.mktemp("learning-flux"), "flux",
                       lambda sd: builders_flux.save_random_flux(sd, 0, "tiny"), 1, lambda rows: {"one": rows * COPIES},
                       TRAINING | LORA, spread_shift=True)
    settings = prepared.family.settings
    assert settings.base_quantization == "nf4" and settings.guidance == 1.0  # what generation runs with
    return prepared


@pytest.fixture(scope="module")
def tuned(inputs: SimpleNamespace) -> Path:
    return finetune(inputs, inputs.sd, "one", "lora")


def test_a_lora_on_the_nf4_base_memorises_the_image(inputs: SimpleNamespace, tuned: Path) -> None:
    assert_draws_closer("flux qlora", inputs, inputs.sd, tuned, 0, 2.0, within=1 / 2)


def test_diffusers_loads_the_adapter_and_gives_the_stage_s_images(inputs: SimpleNamespace, tuned: Path) -> None:
    assert_the_adapter_gives_the_fused_images(inputs, inputs.sd, tuned)
