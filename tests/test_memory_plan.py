"""finetune.memory_budget_gb: the smoke settings measured on the tiny SD2 pipeline before training, refused in one
line just under the planned figure and passed just above it; the measurement is the bench's for the same settings;
FLUX's 4-bit base is tracked on fake tensors as bitsandbytes holds it.

Broken once to see them fail: with the check's call taken out of stages/finetune.py the refusal test fails (nothing
measured, no refusal); the FLUX test failed on its parameters while the adapter stayed fp32 on the meta device (before
memory_plan casts it as peft does on a real base) and on its buffers when the nested absmax map was assumed shared
(bitsandbytes copies it per weight)."""
from __future__ import annotations

import importlib.util
import logging
import sys

import pytest

from stylestudy.core.config import UserError
from stylestudy.data.latents import EncodeSettings
from stylestudy.models.families import flux, sd2
from stylestudy.train import memory_plan
from tests.conftest import REPO, composed

SMOKE = composed("profile=smoke")
GIB = 2**30


def bench() -> object:
    """bench/memory_measured.py as a module."""
    spec = importlib.util.spec_from_file_location("memory_measured", REPO / "bench" / "memory_measured.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memory_measured", module)
    spec.loader.exec_module(module)
    return module


def smoke(**finetune) -> tuple[dict, EncodeSettings]:
    return SMOKE["finetune"] | finetune, EncodeSettings(**SMOKE["encode"])


def test_budget_refuses_just_below_and_passes_just_above(sd_dir, tmp_path, caplog, monkeypatch):
    """The smoke settings (full fine-tune, batch 16, 32 px; validation keeps the VAE) through the finetune stage's
    checks: a budget 1 MiB under the planned figure (the measured step, the VAE kept, the allowance) is refused in
    one line naming the key, the GiB and the remedies, before anything else; 1 MiB over passes, logs the figure, and
    the next check speaks (no data folder here). The step is measured once, at the run's shape, and reused."""
    import torch

    from stages import finetune

    measured = []

    def measure_once(family, config, p, shape, **kwargs):
        if not measured:
            measured.append((shape, real_measure(family, config, p, shape, **kwargs)))
        assert shape == measured[0][0] == (16, 4, 8, 8)  # batch 16, 32 px: the tiny VAE (3 blocks) halves twice
        return measured[0][1]

    real_measure = memory_plan.measure_training
    monkeypatch.setattr(memory_plan, "measure_training", measure_once)
    p, settings = smoke()
    folders = finetune.Folders(sd_dir, tmp_path / "guide", tmp_path / "raw", tmp_path / "split", tmp_path / "out",
                               tmp_path / "live", tmp_path / "scratch")
    with pytest.raises(UserError, match="run the fetch stage first"):
        finetune.check_inputs(folders, p | {"memory_budget_gb": 1000}, settings, sd2.FAMILY)
    vae = memory_plan.frozen_bytes([sd_dir / "vae"], torch.float32)
    need = memory_plan.planned_bytes(measured[0][1], vae)
    assert need > measured[0][1].peak.total + vae + 0.5 * GIB  # the allowance is in
    with pytest.raises(UserError) as refused:
        finetune.check_inputs(folders, p | {"memory_budget_gb": (need - 2**20) / GIB}, settings, sd2.FAMILY)
    line = str(refused.value)
    assert "\n" not in line and "finetune.memory_budget_gb" in line and f"{need / GIB:.2f} GiB" in line
    assert "finetune.method lora" in line and "finetune.train_batch_size 1" in line
    with caplog.at_level(logging.INFO, logger="stylestudy.train.memory_plan"), \
            pytest.raises(UserError, match="run the fetch stage first"):
        finetune.check_inputs(folders, p | {"memory_budget_gb": (need + 2**20) / GIB}, settings, sd2.FAMILY)
    assert f"{need / GIB:.2f} GiB measured at 32 px, batch 16" in caplog.text


def test_no_budget_measures_nothing(sd_dir, tmp_path, monkeypatch):
    """0, the default: no measurement at all (the study's runs pay nothing)."""
    monkeypatch.setattr(memory_plan, "measure_training", lambda *a, **k: pytest.fail("measured"))
    p, settings = smoke()
    memory_plan.check_budget(sd2.FAMILY, sd_dir, p | {"memory_budget_gb": 0}, settings, tmp_path, "cpu")


@pytest.mark.slow
def test_the_check_measures_what_the_bench_measures(sd_dir):
    """The bench's figure for the tiny SD2 at the study's settings and 64 px equals the check's from the pipeline
    folder's config.json: one measured step, two callers."""
    module = bench()
    figures = module.measure(module.ENTRIES["sd2"], "lora", 64, "tiny", module.torch.device("cpu"), fake=True,
                             overrides={})
    p = module.study_settings({"method": "lora"})
    config = memory_plan.denoiser_config(sd_dir, sd2.FAMILY)
    vae = memory_plan.json.loads((sd_dir / "vae" / "config.json").read_text())
    shape = memory_plan.latent_shape(sd2.FAMILY, vae, config, 64, p["train_batch_size"])
    step = memory_plan.measure_training(sd2.FAMILY, config, p, shape)
    assert figures["peak_bytes"] == {"total": step.peak.total, **step.peak.categories}
    assert figures["trainable_parameters"] == step.trainable_parameters > 0


@pytest.mark.slow
def test_flux_nf4_base_is_tracked_packed():
    """FLUX's LoRA on its NF4 base, on fake tensors: each quantised weight holds half a byte a value (parameters)
    and its quantisation constants (buffers: a uint8 absmax per 64 values, an fp32 absmax per 256 of those, the
    16-value NF4 code, an offset and the nested absmax's 256-value map in fp32, a copy each); the kept layers and
    the quantised layers' biases in bf16 (the compute dtype on a GPU), and the adapter in fp32 (peft gives it its
    base layer's compute dtype; lowmem.make_trainable casts it back, as for every LoRA)."""
    import torch

    from stylestudy.models import builders_flux

    module = bench()
    config, vae = module.configs(module.ENTRIES["flux"], "tiny")
    p = module.study_settings({"method": "lora"})
    step = memory_plan.measure_training(flux.FAMILY, config, p, memory_plan.latent_shape(flux.FAMILY, vae, config,
                                                                                         64, 1))
    with torch.device("meta"):
        plain = builders_flux.build_flux_modules("tiny", device="meta")["transformer"]
    quantised = [m.weight.numel() for name, m in plain.named_modules()
                 if isinstance(m, torch.nn.Linear) and not any(name.startswith(k) for k in flux.KEEP)]
    others = sum(t.numel() for t in plain.parameters()) - sum(quantised)
    lora = step.trainable_parameters
    assert step.parameters == sum(t.numel() for t in plain.parameters()) + lora
    between = step.peak.between_steps
    assert between["parameters"] == sum(n // 2 for n in quantised) + 2 * others + 4 * lora
    assert between["buffers"] == sum(n // 64 + 4 * -(-n // 64 // 256) + 4 * (16 + 1 + 256) for n in quantised)
