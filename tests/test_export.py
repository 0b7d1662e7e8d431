"""The export stage (stages/export.py): a fine-tune in the files the UIs load, read back by diffusers, a reader that is
not ours. Tiny models of each family; the drawing round trips are slow (a pipeline load and a few steps each).

Breaks tried: the kohya file written with the library's alpha (= rank) instead of the run's (the LoRA test's
alpha is 2 x rank: its image moved by about 0.07); the OpenCLIP q, k, v stacked in another order (the text encoder's
tensors differ); a resnet rename dropped from single_file.RESNET (ValueError naming the key); modelspec.date taken from
the clock again (the twice-exported files differ); the SDXL test's tiny model built with equally wide text encoders
(from_single_file then reads CLIP-L's weights into the second: text_encoder_2 differs); ComfyUI's rule
(comfyui_keys.py) without `to_out.0` in a transformer block, or kohya names kept with dots (the key-map assertions).
"""
import datetime
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from comfyui_keys import flux_transformer_names, kohya_unet_names
from safetensors import safe_open

from stages import export as stage
from stylestudy.core.checks import check_export_settings
from stylestudy.core.config import DATE_TODAY_OR_NONE, UserError
from stylestudy.models import export, single_file
from stylestudy.models.families import FAMILIES, flux
from stylestudy.train import lora

PARAMS = {"lora_layout": "auto", "checkpoint": "auto", "checkpoint_dtype": "fp16", "date": "none"}
RANK, ALPHA = 4, 8.0
# the tiny FLUX held unquantised here, so that the fused folder is exactly the base plus the adapter
TRAINED_AS = {"flux": flux.Flux(flux.FluxSettings(base_quantization="none"))}


def fine_tuned(base: Path, out: Path, family_name: str, method: str) -> Path:
    """A finetune-like folder of `base`: LoRA (seeded, non-zero B) fused into the denoiser, or a full fine-tune
    (every weight moved a little), with training_info.json as finetune writes the keys export reads."""
    family = TRAINED_AS.get(family_name, FAMILIES[family_name])
    shutil.copytree(base, out)
    torch.manual_seed(3)
    denoiser = family.load_denoiser(base)
    if method == "lora":
        lora.add_lora(denoiser, RANK, ALPHA, family.lora_targets)
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
        lora.save_adapter(denoiser, out / "lora", family)
        denoiser = lora.fused_copy(denoiser)
    else:
        for param in denoiser.parameters():
            param.data.add_(torch.randn_like(param) * 0.01)
    shutil.rmtree(out / family.denoiser_folder)
    denoiser.save_pretrained(out / family.denoiser_folder, safe_serialization=True)
    info = {"params": {"method": method}, "encode": {"resolution": 32}, "base_model": {"source": "tiny", "seed": 0}}
    (out / "training_info.json").write_text(json.dumps(info))
    return out


def exported(tmp_path: Path, base: Path, family_name: str, method: str, p: dict = PARAMS) -> tuple[Path, Path]:
    folder = fine_tuned(base, tmp_path / "finetuned", family_name, method)
    out = tmp_path / "export"
    stage.run({"finetuned": folder, "base": base, "out": out}, p, FAMILIES[family_name])
    return folder, out


def header(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    """A model folder's weight shapes, from its safetensors headers."""
    shapes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            shapes |= {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    return shapes


def assert_comfyui_maps_every_module(path: Path, unet: Path) -> None:
    """Every module of a kohya file is one ComfyUI's key map names for this UNet (comfyui_keys.py), with down, up and
    alpha, and up @ down has the shape of the weight it patches."""
    targets = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): shape
               for k, shape in weight_shapes(unet).items() if k.endswith(".weight")}
    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
        names = {k.split(".")[0] for k in keys}
        unmapped = names - kohya_unet_names(json.loads((unet / "config.json").read_text()))
        assert not unmapped, f"{len(unmapped)} modules ComfyUI does not map, e.g. {sorted(unmapped)[0]}"
        assert keys == {f"{n}.{part}" for n in names for part in ("lora_down.weight", "lora_up.weight", "alpha")}
        for name in names:
            up, down = (handle.get_slice(f"{name}.lora_{side}.weight").get_shape() for side in ("up", "down"))
            assert [up[0], down[1]] == targets[name], name


def draw(pipe) -> "torch.Tensor":
    return pipe("a statue of a man on horse", num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_sd2_lora_exports_every_module_in_kohya_s_layout_with_its_metadata(sd_dir, tmp_path, one_thread):
    _, out = exported(tmp_path, sd_dir, "sd2", "lora")
    assert json.loads((out / "export.json").read_text())["files"] == {
        "pytorch_lora_weights.safetensors": "lora", "sketch-sd2-lora.safetensors": "lora"}
    with safe_open(str(out / "sketch-sd2-lora.safetensors"), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
        alphas = {handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    modules = export.adapted_modules(dict.fromkeys(safe_open(str(out / "pytorch_lora_weights.safetensors"),
                                                             "pt").keys()))
    assert len(keys) == 3 * len(modules) and all(export.KOHYA_KEY.fullmatch(k) for k in keys)
    assert alphas == {ALPHA}
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8" and meta["modelspec.resolution"] == "32x32"
    assert meta["modelspec.license"] == "CreativeML Open RAIL++-M" and "modelspec.date" not in meta  # date: none
    assert {"modelspec.sai_model_spec", "modelspec.title", "ss_sd_model_name",
            "stylestudy.base_denoiser_sha256"} <= meta.keys()
    assert not any(str(tmp_path) in value for value in meta.values())
    assert_comfyui_maps_every_module(out / "sketch-sd2-lora.safetensors", tmp_path / "finetuned" / "unet")
    assert "## Use it in ComfyUI / AUTOMATIC1111 / diffusers" in (out / "README.md").read_text()


def test_exporting_the_same_fine_tune_twice_gives_the_same_bytes(sd_dir, tmp_path, monkeypatch, one_thread):
    """Every file export writes is a function of its inputs: a LoRA run with its fused single file, exported on two
    days (SOURCE_DATE_EPOCH, the clock that the stage once read for modelspec.date), gives the same bytes; the date
    in the headers is params export.date."""
    folder = fine_tuned(sd_dir, tmp_path / "finetuned", "sd2", "lora")
    p = PARAMS | {"checkpoint": "single_file", "date": "2026-12-08"}
    for day, epoch in enumerate(("1765000000", "1765200000")):  # 2025-12-06 and 2025-12-08
        monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
        stage.run({"finetuned": folder, "base": sd_dir, "out": tmp_path / f"export{day}"}, p, FAMILIES["sd2"])
    names = sorted(f.name for f in (tmp_path / "export0").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "export1").iterdir()) and len(names) == 5
    for name in names:
        assert (tmp_path / "export0" / name).read_bytes() == (tmp_path / "export1" / name).read_bytes(), name
    assert {header(tmp_path / "export0" / n)["modelspec.date"] for n in names if n.endswith(".safetensors")} == {
        "2026-12-08"}


@pytest.mark.parametrize("value, ok", [("none", True), ("today", True), ("2026-12-08", True),
                                       (datetime.date(2026, 12, 8), True), ("2026-12-8", False), ("2026-13-01", False),
                                       ("Today", False), (None, False)])
def test_export_date_is_a_calendar_date_today_or_none(value, ok):
    assert DATE_TODAY_OR_NONE.ok(value) is ok


def test_export_date_today_is_the_utc_date_the_stage_runs():
    before = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert stage.export_date("today") in {before, datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    assert stage.export_date("none") == "none" and stage.export_date(datetime.date(2026, 12, 8)) == "2026-12-08"


def test_a_module_the_denoiser_lacks_or_a_dropped_key_is_an_error(sd_dir, tmp_path):
    adapter = export.read_adapter(fine_tuned(sd_dir, tmp_path / "f", "sd2", "lora") / "lora" /
                                  lora.ADAPTER_FILE)
    modules = export.denoiser_modules(tmp_path / "f" / "unet")
    kohya = export.to_kohya(adapter, modules)
    with pytest.raises(ValueError, match="names no module"):
        export.to_kohya(adapter, {m for m in modules if "attn1" not in m})
    dropped = {k: v for k, v in kohya.items() if not k.endswith("to_q.alpha")}
    with pytest.raises(ValueError, match="lacks one of"):
        export.check_kohya(dropped, export.adapted_modules(adapter.layers), modules)
    with pytest.raises(ValueError, match="no original-layout key"):
        single_file.unet_to_original({"down_blocks.0.resnets.0.mystery.weight": torch.zeros(1)},
                                     {"layers_per_block": 1})


@pytest.mark.parametrize("family, export_params, refused", [
    ("sd3", {"checkpoint": "single_file"}, "export.checkpoint single_file is not built for model family sd3"),
    ("sd3", {"lora_layout": "kohya"}, "export.lora_layout kohya is a UNet layout"),
])
def test_a_layout_the_family_has_no_form_for_is_refused_when_params_are_checked(family, export_params, refused):
    params = {"model": {"family": family}, "export": PARAMS | export_params}
    with pytest.raises(UserError, match=refused):
        check_export_settings(params)
    check_export_settings({"model": {"family": "sd2"}, "export": PARAMS | export_params | {"lora_layout": "kohya"}})


def test_a_fine_tune_of_another_family_is_refused(sd_dir, tmp_path):
    folder = fine_tuned(sd_dir, tmp_path / "finetuned", "sd2", "full")
    with pytest.raises(UserError, match="params model.family is sdxl"):
        stage.run({"finetuned": folder, "base": sd_dir, "out": tmp_path / "out"}, PARAMS, FAMILIES["sdxl"])


def test_sd2_kohya_lora_on_the_base_draws_the_fused_folder_s_image(sd_dir, tmp_path, one_thread):
    folder, out = exported(tmp_path, sd_dir, "sd2", "lora")
    family = FAMILIES["sd2"]
    base = family.load_pipeline(sd_dir)
    base.load_lora_weights(out, weight_name="sketch-sd2-lora.safetensors")
    difference = abs(draw(base) - draw(family.load_pipeline(folder))).max()
    assert difference < 1e-4, difference  # measured 3e-5 (fused vs unfused float rounding); 0.07 with alpha = rank


def test_sd2_single_file_loads_the_fine_tuned_weights_and_draws_its_image(sd_dir, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    folder, out = exported(tmp_path, sd_dir, "sd2", "full", PARAMS | {"checkpoint_dtype": "fp32"})
    assert header(out / "sketch-sd2.safetensors")["modelspec.architecture"] == "stable-diffusion-v2-512"
    loaded = StableDiffusionPipeline.from_single_file(out / "sketch-sd2.safetensors", config=str(sd_dir),
                                                      local_files_only=True)
    reference = FAMILIES["sd2"].load_pipeline(folder)
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert abs(draw(loaded) - draw(reference)).max() == 0


@pytest.mark.slow
def test_sdxl_single_file_and_kohya_lora_round_trip(tmp_path, one_thread):
    """The tiny SDXL's second text encoder is made 48 wide, the first 32, as the real ones differ (768, 1280):
    diffusers' reader tells them apart by width, and with equal widths reads CLIP-L's weights into both (measured).
    So from_single_file reads the whole checkpoint as a user's call does, all four components."""
    from diffusers import StableDiffusionXLPipeline

    from stylestudy.models import builders_sdxl

    base = tmp_path / "sdxl"
    builders_sdxl.save_random_sdxl(base, 0, "tiny", shaped=False, second_width=48)
    folder, out = exported(tmp_path / "full", base, "sdxl", "full", PARAMS | {"checkpoint_dtype": "fp32"})
    path = out / "sketch-sdxl.safetensors"
    assert header(path)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    loaded = StableDiffusionXLPipeline.from_single_file(path, config=str(base), local_files_only=True)
    reference = FAMILIES["sdxl"].load_pipeline(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert abs(draw(loaded) - draw(reference)).max() < 1e-5  # measured 1.1e-6: equal weights, other memory layouts
    folder, out = exported(tmp_path / "lora", base, "sdxl", "lora")
    assert_comfyui_maps_every_module(out / "sketch-sdxl-lora.safetensors", folder / "unet")
    pipe = FAMILIES["sdxl"].load_pipeline(base)
    pipe.load_lora_weights(out, weight_name="sketch-sdxl-lora.safetensors")
    assert abs(draw(pipe) - draw(FAMILIES["sdxl"].load_pipeline(folder))).max() < 1e-4


@pytest.mark.slow
def test_sd3_lora_in_diffusers_layout_draws_the_fused_folder_s_image(sd3_dir, tmp_path, one_thread):
    folder, out = exported(tmp_path, sd3_dir, "sd3", "lora")
    files = json.loads((out / "export.json").read_text())["files"]
    assert "sketch-sd3.safetensors" not in files and "sketch-sd3-lora.safetensors" in files
    keys = safe_open(str(out / "sketch-sd3-lora.safetensors"), "pt").keys()
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    pipe = FAMILIES["sd3"].load_pipeline(sd3_dir)
    pipe.load_lora_weights(out, weight_name="sketch-sd3-lora.safetensors")
    assert abs(draw(pipe) - draw(FAMILIES["sd3"].load_pipeline(folder))).max() < 1e-4


@pytest.mark.slow
def test_flux_lora_in_diffusers_layout_draws_the_fused_folder_s_image(tmp_path, one_thread):
    """FLUX's UI layout is diffusers' own (ComfyUI maps `transformer.<module>` with lora_A / lora_B): the exported
    file, read by diffusers' load_lora_weights on the tiny base, draws the fused folder's image; its header names
    FLUX.1-dev and its non-commercial licence."""
    from stylestudy.models import builders_flux

    base = tmp_path / "flux"
    builders_flux.save_random_flux(base, 0, "tiny", shaped=False)
    folder, out = exported(tmp_path, base, "flux", "lora")
    files = json.loads((out / "export.json").read_text())["files"]
    assert files == {"pytorch_lora_weights.safetensors": "lora", "sketch-flux-lora.safetensors": "lora"}
    path = out / "sketch-flux-lora.safetensors"
    meta = header(path)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_network_dim"] == str(RANK)
    assert meta["modelspec.license"] == "FLUX.1 [dev] Non-Commercial License"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    keys = set(safe_open(str(path), "pt").keys())
    modules = {re.sub(r"\.lora_[AB]\.weight$", "", k) for k in keys}
    assert keys == {f"{m}.lora_{side}.weight" for m in modules for side in "AB"}
    config = json.loads((base / "transformer" / "config.json").read_text())
    assert modules <= flux_transformer_names(config), sorted(modules - flux_transformer_names(config))[:3]
    pipe = FAMILIES["flux"].load_pipeline(base)
    untouched, fused = draw(pipe), draw(FAMILIES["flux"].load_pipeline(folder))
    pipe.load_lora_weights(out, weight_name="sketch-flux-lora.safetensors")
    assert abs(untouched - fused).max() > 1e-3  # the adapter moves the image (measured 0.019)
    assert abs(draw(pipe) - fused).max() < 1e-4  # measured 6e-7


def test_the_smoke_run_exports_a_single_file_diffusers_reads_as_the_fine_tuned_folder(smoke_run, one_thread):
    """The smoke DAG's full fine-tune: its fp16 checkpoint holds the fine-tuned folder's weights, rounded to fp16."""
    from diffusers import StableDiffusionPipeline

    root = smoke_run.root
    path = root / "models/export/sketch-sd2.safetensors"
    loaded = StableDiffusionPipeline.from_single_file(path, config=str(root / "models/pretrained/sd"),
                                                      local_files_only=True, torch_dtype=torch.float16)
    reference = FAMILIES["sd2"].load_pipeline(root / "models/finetuned")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k].half()) for k in theirs if theirs[k].is_floating_point()), name
