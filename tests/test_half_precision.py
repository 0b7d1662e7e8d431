"""The CUDA-only branches on the CPU: each stage in half precision (tests/conftest.py `half_precision`: fp16 with
autocast and a loss scaler as on a GPU, then bf16), and the fixes of what only a GPU would have shown (issue 23): the
scoring CLIP loaded with half=True, DeepSpeed's half weights meeting fp32 cached inputs, and fp16 steps the loss
scaler skips."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import composed, emulate_cuda_fp16, fresh_accelerator_state
from stages import blip_check, clip_eval, embed_real, fetch, finetune, generate
from stylestudy.data import dataset, latents
from stylestudy.data.dataset import write_jsonl
from stylestudy.evaluate import embeddings
from stylestudy.models import families, loading
from stylestudy.train import batches, build, checkpoints, loop, losses

pytestmark = pytest.mark.usefixtures("one_thread")
P = composed("profile=smoke")
SEED = 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> SimpleNamespace:
    """The smoke setting's tiny models and a few synthetic sketches, split by hand: 8 to train, 2 val, 4 test."""
    root = tmp_path_factory.mktemp("half")
    for kind in ("sd", "clip", "blip", "guide", "csd"):
        fetch.run(kind, {"source": "tiny", "repo_id": "", "revision": "", "path": "", "variant": "default"}, SEED,
                  root / kind)
    fetch.run("data", P["fetch"]["data"] | {"n_images": 14}, SEED, root / "raw")
    rows = dataset.read_metadata(root / "raw")
    (root / "split").mkdir()
    for name, part in (("train", rows[:8]), ("val", rows[8:10]), ("test", rows[10:])):
        write_jsonl(root / "split" / f"{name}.jsonl", part)
    return SimpleNamespace(root=root, sd=root / "sd", clip=root / "clip", blip=root / "blip", guide=root / "guide",
                           csd=root / "csd",
                           raw=root / "raw", split=root / "split", rows=rows)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ------------------------------------------------------------------------------------------------ fix 1: scoring CLIP

def test_the_scoring_clip_loaded_with_half_true_embeds_images_as_in_fp32(folders) -> None:
    """open_clip's half=True leaves the embeddings in fp32: the pixels must take the first layer's dtype, not that of
    the model's first parameter (fp32), or its fp16 conv1 refuses them."""
    images = [Image.open(folders.raw / row["file_name"]) for row in folders.rows[:3]]
    full, preprocess, tokenizer = loading.load_clip(folders.clip)
    half, _, _ = loading.load_clip(folders.clip, half=True)
    got, want = (embeddings.embed_images(m, preprocess, images, 2, None) for m in (half, full))
    assert got.dtype == np.float32 and cosines(got, want).min() > 0.999
    assert next(half.parameters()).dtype == torch.float32 and embeddings.pixel_weight(half).dtype == torch.float16
    texts = [row["text"] for row in folders.rows[:3]]
    assert cosines(embeddings.embed_texts(half, tokenizer, texts, 2),
                   embeddings.embed_texts(full, tokenizer, texts, 2)).min() > 0.999


def test_embed_real_and_clip_eval_run_in_half_precision(folders, half_precision, tmp_path) -> None:
    info = embed_real.run(folders.clip, folders.csd, folders.raw, folders.split, tmp_path / "real", {"batch_size": 3})
    assert info["n_embedded"] == 4
    rows = [{"path": folders.raw / row["file_name"]} for row in folders.rows[10:]]
    image_features, text_features = clip_eval.embed_samples(folders.clip, rows, ["a", "b", "c", "d"], 3)
    real = embeddings.load_real(tmp_path / "real", embeddings.describe_clip(folders.clip))
    assert cosines(image_features, real).min() > 0.999  # the same images, embedded by both stages
    assert np.isfinite(text_features).all() and text_features.shape == (4, image_features.shape[1])


# ------------------------------------------------------------------------------------------------ the other stages

def test_blip_captions_in_half_precision(folders, half_precision) -> None:
    paths = [folders.raw / row["file_name"] for row in folders.rows[:3]]
    got = blip_check.captions(folders.blip, paths, P["blip_check"] | {"batch_size": 2})
    assert len(got) == 3 and all(isinstance(text, str) for text in got)


def test_generation_in_half_precision(folders, half_precision, tmp_path) -> None:
    p = P["generate"] | {"prompts": ["a house"], "images_per_prompt": 2, "test_captions": 1}
    rows = generate.run("base", folders.sd, folders.split, tmp_path / "out", p, SEED)
    assert {row["dtype"] for row in rows} == {str(half_precision).split(".")[-1]}
    pixels = np.asarray(Image.open(tmp_path / "out" / rows[0]["file_name"]))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0  # a real image, not NaN turned black


def test_decode_under_model_offload_puts_latents_where_the_vae_computes(folders, monkeypatch) -> None:
    """Issue 29 defect 3: with generate.memory cpu_offload the VAE waits on the CPU between calls and its hook moves it
    to the GPU, not its arguments; decode must send the latents to the pipeline's execution device, not to where the
    VAE is parked. Emulated on the CPU: offload hooks (execution device cpu) and a VAE that reports being parked on the
    meta device."""
    pipe = families.load_pipeline(folders.sd)
    pipe.enable_model_cpu_offload(device="cpu")
    monkeypatch.setattr(type(pipe.vae), "device", property(lambda self: torch.device("meta")))
    family = families.family_of_pipeline(pipe)
    images = generate.decode(pipe, family, torch.randn(2, 4, 8, 8), vae_batch_size=1)
    assert len(images) == 2 and images[0].size == (32, 32)


FINETUNES = {
    "cached latents, CLIP loss": ({"cache_latents": True}, {"clip_loss": {"weight": 0.1, "kind": "global",
                                                                          "max_timestep": 1000, "every": 1}}),
    "encoded every step": ({"cache_latents": False}, {}),
    # issue 31: LoRA's frozen base in the half type (fp16 with the loss scaler: the adapter must stay fp32)
    "LoRA on a half-precision base": ({"cache_latents": True}, {"method": "lora", "lora_half_base": True}),
}
DIRECTIONAL = {"clip_loss": {"weight": 0.1, "kind": "directional", "max_timestep": 1000, "every": 1}}
# issue 29 defect 1: the full fine-tune's frozen reference copy, made before accelerate's autocast, stayed fp32 and met
# the half-precision cached embeddings; LoRA's reference is the trainee with its adapter off
SLOW_FINETUNES = {"directional CLIP loss, full": ({"cache_latents": True}, DIRECTIONAL),
                  "directional CLIP loss, lora": ({"cache_latents": True}, {"method": "lora"} | DIRECTIONAL)}


@pytest.mark.parametrize("variant", [*FINETUNES,
                                     *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW_FINETUNES)])
def test_finetune_in_half_precision_with_validation(folders, half_precision, tmp_path, variant: str) -> None:
    """The fine-tune as on a GPU: frozen VAE and text encoder in the half type, autocast (and in fp16 the loss scaler)
    around an fp32 UNet, validation loss and images, the CLIP loss through the fp16 VAE decoder."""
    encoding, options = (FINETUNES | SLOW_FINETUNES)[variant]
    p = P["finetune"] | {"max_train_steps": 2, "train_batch_size": 4, "validate_every": 2, "validation_images": 1,
                         "validation_steps": 2, "checkpoint_every": 0, "optimizer": "adamw", "use_ema": True,
                         "mixed_precision": "fp16" if half_precision == torch.float16 else "bf16"} | options
    settings = latents.EncodeSettings(**P["encode"] | encoding | {"mixed_precision": p["mixed_precision"]})
    out = finetune.Folders(folders.sd, folders.guide, folders.raw, folders.split, tmp_path / "model", tmp_path / "live",
                           tmp_path / "scratch")
    summary = finetune.run(out, p, settings, SEED, P["generate"]["style_prompt"])
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    unet = families.load_pipeline(tmp_path / "model").unet
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in unet.parameters())
    assert (tmp_path / "live/plots/metrics/val_loss.tsv").is_file()
    info = json.loads((tmp_path / "model/training_info.json").read_text())
    assert info["mixed_precision_ran"] == p["mixed_precision"]


@pytest.mark.slow
def test_finetune_without_mixed_precision_takes_half_precision_cached_inputs(folders, half_precision,
                                                                            tmp_path) -> None:
    """Issue 29 defect 2: finetune.mixed_precision no (fp32 denoiser, no autocast) with the encoders still in the half
    type (encode.mixed_precision): the cached embeddings follow the denoiser's dtype."""
    p = P["finetune"] | {"max_train_steps": 1, "train_batch_size": 4, "validate_every": 0, "checkpoint_every": 0,
                         "optimizer": "adamw", "mixed_precision": "no"}
    settings = latents.EncodeSettings(**P["encode"] | {"mixed_precision": "fp16"})
    out = finetune.Folders(folders.sd, folders.guide, folders.raw, folders.split, tmp_path / "model", tmp_path / "live",
                           tmp_path / "scratch")
    summary = finetune.run(out, p, settings, SEED, P["generate"]["style_prompt"])
    assert summary["steps"] == 1 and np.isfinite(summary["final_loss"])


# ------------------------------------------------------------------------------------------------ fix 2: DeepSpeed

def test_under_deepspeed_cached_fp32_inputs_meet_the_half_unet_in_its_dtype(folders) -> None:
    """DeepSpeed casts the UNet to bf16 and adds no autocast: cached latents and text embeddings arrive in fp32."""
    family = families.check_pipeline_folder(folders.sd)
    unet = family.load_denoiser(folders.sd).to(torch.bfloat16)  # what DeepSpeed's bf16 does to the module
    deepspeed = SimpleNamespace(distributed_type="DEEPSPEED", mixed_precision="bf16")
    assert build.denoiser_input_dtype(deepspeed) == torch.bfloat16
    assert build.denoiser_input_dtype(SimpleNamespace(distributed_type="NO", mixed_precision="bf16")) is None
    trainee = losses.Trainee(family, unet, family.load_noise_process(folders.sd), build.denoiser_input_dtype(deepspeed))
    encoders = family.load_encoders(folders.sd, torch.device("cpu"), torch.float32)
    settings = latents.EncodeSettings(**P["encode"])
    data = batches.training_data(folders.raw, folders.rows[:4], encoders, settings, 0.0, show_progress=False)
    batch = data.collate([(i, data.items[i]) for i in range(4)])
    inputs = data.to_inputs(batch)
    assert inputs.latents.dtype == torch.float32 and inputs.conditioning.sequence.dtype == torch.float32
    terms = losses.training_loss(inputs, trainee, P["finetune"] | {"clip_loss": {"weight": 0.0}}, 0, None)
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])


@pytest.mark.slow
def test_under_deepspeed_the_directional_loss_s_reference_gets_the_cast_inputs(folders) -> None:
    """Issue 29 defect 1: with LoRA the reference is the trainee with its adapter off, which DeepSpeed cast to half in
    place: it must get the inputs cast as the trainee does, not the fp32 cached ones."""
    from stylestudy.train import lora

    family = families.check_pipeline_folder(folders.sd)
    unet = family.load_denoiser(folders.sd)
    lora.add_lora(unet, 4, 4, family.lora_targets)
    unet.to(torch.bfloat16)  # what DeepSpeed's bf16 does to the module, adapter included
    trainee = losses.Trainee(family, unet, family.load_noise_process(folders.sd), torch.bfloat16)
    encoders = family.load_encoders(folders.sd, torch.device("cpu"), torch.float32)
    data = batches.training_data(folders.raw, folders.rows[:4], encoders, latents.EncodeSettings(**P["encode"]), 0.0,
                                 show_progress=False)
    inputs = data.to_inputs(data.collate([(i, data.items[i]) for i in range(4)]))
    reference = losses.reference_denoiser(trainee, "lora", torch.device("cpu"))
    guide = losses.load_guide(folders.guide, torch.device("cpu"), encoders.vae, family, "a sketch of", "directional",
                              reference)
    clip = {"weight": 0.1, "kind": "directional", "max_timestep": 1000, "every": 1}
    torch.manual_seed(SEED)
    terms = losses.training_loss(inputs, trainee, P["finetune"] | {"clip_loss": clip}, 0, guide)
    assert torch.isfinite(terms["loss_clip"]) and terms["loss_clip"] > 0


# ------------------------------------------------------------------------------------------------ fix 4: skipped steps

class Recorder:
    """dvclive's Live as the loop uses it: the metrics of every logged step."""

    def __init__(self) -> None:
        self.steps: list[dict] = [{}]

    def log_metric(self, name: str, value: float) -> None:
        self.steps[-1][name] = value

    def next_step(self) -> None:
        self.steps.append({})


def collate(pairs: list) -> batches.PixelBatch:
    return batches.PixelBatch(torch.stack([x for _, x in pairs]), ["" for _ in pairs], [i for i, _ in pairs])


OVERFLOWS = 2  # the item whose batch overflows in fp16


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused adamw"])
def test_an_fp16_step_the_loss_scaler_skips_is_not_counted(monkeypatch, fused: bool) -> None:
    """A forced overflow: the loss scaler skips that step, which is then not counted, not seen by the EMA and the LR
    schedule (with the fused optimizer too, whose skips accelerate does not see), and not logged; the run still makes
    its max_steps applied steps."""
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    monkeypatch.setattr(losses, "training_loss", lambda inputs, trainee, p, step, guide: {
        "loss": trainee.denoiser(inputs.pixels).float().mean() * (1e38 if OVERFLOWS in inputs.index else 1e-3)})
    with fresh_accelerator_state():
        accelerator = emulate_cuda_fp16(Accelerator(mixed_precision="fp16", cpu=True))
        model = torch.nn.Linear(4, 4)
        trainable = list(model.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=0.1, fused=fused)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        ema = EMAModel(trainable, decay=0.5, foreach=True)
        items = checkpoints.SeededItems(batches.Numbered(list(torch.randn(6, 4))), SEED)
        loader = accelerator.prepare(torch.utils.data.DataLoader(items, batch_size=1, collate_fn=collate))
        model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
        trainee = losses.Trainee(None, model, None)
        state = build.TrainingState(trainee, model, trainable, optimizer, schedule, ema, loader, max_steps=5,
                                    steps_per_epoch=6)
        live = Recorder()
        p = {"max_grad_norm": 1.0, "validate_every": 0, "checkpoint_every": 0}
        summary = loop.train(state, loop.Extras(lambda batch: batch, None, None, live), checkpoints.Position(), p,
                             accelerator, lambda position: None)
    logged = live.steps[:-1]
    assert int(optimizer.optimizer.state[trainable[0]]["step"]) == 5  # 6 batches, one overflowed: 5 applied steps
    assert all(np.isfinite(step["grad_norm"]) for step in logged) and len(logged) == 5
    assert ema.optimization_step == 5 and schedule.scheduler.last_epoch == 5
    assert logged[-1]["lr"] == pytest.approx(0.1 / 6)  # 1 / (1 + 5): the schedule stepped 5 times
    assert (summary["steps"], summary["skipped_steps"]) == (5, 1)


# ------------------------------------------------------------------------------------------------ fix 5: no GPU in tests

def test_the_suite_and_every_process_it_starts_see_no_gpu() -> None:
    """Resumed weights bit for bit and the same metrics twice hold on a CPU: on a GPU machine the suite hides it."""
    import os
    import subprocess
    import sys

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "''"
