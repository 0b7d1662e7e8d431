"""Loading, checking and copying the three model folders (SD pipeline, open_clip, BLIP), and tiny random builders.

Folders are canonical library formats, safetensors only: a diffusers `StableDiffusionPipeline` folder, an open_clip
`local-dir:` folder (`open_clip_config.json` + `open_clip_model.safetensors`) and a transformers BLIP captioner
folder. Heavy libraries are imported inside the functions so that importing this module stays fast.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from stages.config import UserError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPTokenizer

# bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward" while diffusers imports it; users read it as
# an error. Set before any import of it, hence at module level.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_WEIGHTED = ("unet", "vae", "text_encoder")
CLIP_CONFIG = "open_clip_config.json"
CLIP_WEIGHTS = "open_clip_model.safetensors"
# open_clip prefers these names in this order; a plain model.safetensors beside them is usually the HF-format twin.
CLIP_WEIGHT_NAMES = (CLIP_WEIGHTS, "open_clip_pytorch_model.safetensors")
CLIP_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "merges.txt", "vocab.txt", "spiece.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_ONLY = "pickle weights only; this project loads safetensors only: fetch or convert the .safetensors files"
BLIP_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]")
BLIP_WORDS = """
a an the of with and in on at to from by for near next behind under over its his her their this that there is are
drawing drawings sketch sketches sketched draw drawn black white pencil pen ink charcoal line lines outline shading
photo photograph picture image painting art artwork illustration cartoon doodle portrait style paper page simple rough
man men woman women boy girl child children person people baby face head hand hands eye eyes hair body arm leg legs
horse horses dog dogs cat cats bird birds cow sheep pig elephant giraffe zebra bear lion tiger fish duck chicken rabbit
mouse snake frog monkey deer fox wolf owl butterfly insect animal animals tree trees flower flowers grass plant leaf
house building castle church tower bridge road street city car cars bus truck train bicycle boat ship airplane plane
chair table bed sofa lamp cup bottle vase bowl plate knife fork spoon clock book shoe hat shirt bag umbrella ball
kite guitar phone computer window door wall floor roof fence sky cloud clouds sun moon star mountain mountains hill
river lake sea ocean beach water rock stone snow field forest garden park sand wave
big small large little tall short long old young new dark light gray grey red blue green yellow brown two three four
one some many several standing sitting running walking riding flying eating holding looking playing sleeping lying
jumping smiling wearing carrying side front back top close up view shape shapes detailed sketchy . , ' -
""".split()


def _quiet_libraries() -> None:
    """Keep transformers/diffusers warnings (init notes, deprecations) out of the user's terminal."""
    for name in ("transformers", "diffusers", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _user_errors(path: Path, what: str) -> Iterator[None]:
    """Turn a library's missing-file error while loading `path` into a one-line UserError."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot load it as {what} ({str(e).splitlines()[0]}); re-create the folder") from e


def _require_dir(path: Path, what: str) -> None:
    """Raise UserError unless `path` is an existing folder."""
    if not path.exists():
        raise UserError(f"{path}: does not exist; expected {what} folder (check the path, or fetch the model)")
    if not path.is_dir():
        raise UserError(f"{path}: is a file; expected {what} folder (give the folder, not a single weights file)")


def _read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, or raise UserError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable JSON ({e}); re-create the folder") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; re-create the folder")
    return data


def _require_safetensors(folder: Path, names: tuple[str, ...] = ()) -> None:
    """Raise UserError unless `folder` holds safetensors weights (any, or one of `names`), refusing pickle-only."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(n in names if names else n.endswith((".safetensors", ".safetensors.index.json")) for n in files):
        return
    if any(n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json") for n in files):
        raise UserError(f"{folder}: {SAFETENSORS_ONLY}")
    expected = " or ".join(names) if names else "*.safetensors"
    raise UserError(f"{folder}: no weights ({expected}); re-create or re-download the folder")


def check_sd_folder(path: Path) -> None:
    """Cheaply check that `path` is a diffusers StableDiffusionPipeline folder with safetensors weights."""
    _require_dir(path, "a Stable Diffusion pipeline")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path}: no model_index.json; expected a diffusers Stable Diffusion pipeline folder")
    name = _read_json(index).get("_class_name")
    if name != "StableDiffusionPipeline":
        raise UserError(f"{index}: _class_name is {name!r}, expected 'StableDiffusionPipeline'; give an SD folder")
    for component in SD_COMPONENTS:
        if not (path / component).is_dir():
            raise UserError(f"{path}: missing the {component}/ folder of the pipeline; re-create or re-download it")
    for component in SD_WEIGHTED:
        _require_safetensors(path / component)


def check_clip_folder(path: Path) -> None:
    """Cheaply check that `path` is an open_clip local-dir folder with safetensors weights."""
    _require_dir(path, "an open_clip")
    config = path / CLIP_CONFIG
    if not config.is_file():
        raise UserError(f"{path}: no {CLIP_CONFIG}; expected an open_clip folder (config + {CLIP_WEIGHTS})")
    if "model_cfg" not in _read_json(config):
        raise UserError(f"{config}: no 'model_cfg' key; expected an open_clip config file")
    _require_safetensors(path, CLIP_WEIGHT_NAMES)


def check_blip_folder(path: Path) -> None:
    """Cheaply check that `path` is a transformers BLIP captioning folder with safetensors weights."""
    _require_dir(path, "a BLIP captioning")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json; expected a transformers BLIP captioning folder")
    config = _read_json(config_file)
    if config.get("model_type") != "blip":
        raise UserError(f"{config_file}: model_type is {config.get('model_type')!r}, expected 'blip'")
    architectures = config.get("architectures") or ["BlipForConditionalGeneration"]
    if "BlipForConditionalGeneration" not in architectures:
        raise UserError(f"{config_file}: architectures {architectures} is not a captioner (BlipForConditionalGeneration)")
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise UserError(f"{path}: no preprocessor_config.json; the folder lacks its BlipProcessor files")
    _require_safetensors(path, ("model.safetensors", "model.safetensors.index.json"))


def sd_tokenizer_from_open_clip() -> CLIPTokenizer:
    """A CLIPTokenizer equal to SD2's, built offline from the BPE vocabulary that ships inside open_clip."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    _quiet_libraries()
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # the slice open_clip and SD2 use
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    # SD2 pads with "!" (id 0); without model_max_length the tokenizer would pad to 1e30.
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token="!",
                         model_max_length=77)


def save_tiny_sd(out_dir: Path, seed: int) -> None:
    """Build a tiny randomly initialised Stable Diffusion pipeline from configs and save it as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_libraries()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=32, sample_size=32)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, projection_dim=32,
            max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", pad_token_id=0, bos_token_id=49406,
            eos_token_id=49407))
    # SD2-base's scheduler_config.json values.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=sd_tokenizer_from_open_clip(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def _write_open_clip(out_dir: Path, config: dict[str, Any], state_dict: dict[str, Any]) -> None:
    """Write an open_clip local-dir folder: the JSON config and the weights as safetensors."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out_dir / CLIP_WEIGHTS))


def save_tiny_clip(out_dir: Path, seed: int) -> None:
    """Build a tiny random open_clip model and save it as an open_clip `local-dir:` folder."""
    import open_clip
    import torch

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
    }
    preprocess_cfg = {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                      "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    _write_open_clip(out_dir, {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, model.state_dict())


def save_tiny_blip(out_dir: Path, seed: int) -> None:
    """Build a tiny random BLIP captioner (BlipForConditionalGeneration + BlipProcessor) and save it."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    _quiet_libraries()
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*BLIP_SPECIAL, *BLIP_WORDS, "##s", "##ing", "##ed"]))}
    # Like the real captioner: [DEC] starts a caption, [SEP] ends it. BertTokenizerFast(vocab_file=) ignores the file.
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"], model_max_length=512)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 512, "projection_dim": 32, "pad_token_id": 0,
            "bos_token_id": vocab["[DEC]"], "eos_token_id": vocab["[SEP]"], "sep_token_id": vocab["[SEP]"]}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8, "projection_dim": 32}
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32, image_text_hidden_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def load_sd_pipeline(path: Path) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline folder (safetensors only), after checking it is one."""
    check_sd_folder(path)
    from diffusers import StableDiffusionPipeline

    _quiet_libraries()
    with _user_errors(path, "a Stable Diffusion pipeline"):
        return StableDiffusionPipeline.from_pretrained(
            path, use_safetensors=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def load_clip(path: Path, device: str = "cpu") -> tuple[Any, Callable, Callable]:
    """Return (model, preprocess, tokenizer) for an open_clip local-dir folder, model in eval mode."""
    check_clip_folder(path)
    import open_clip

    with _user_errors(path, "an open_clip model"):
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.eval(), preprocess, tokenizer


def load_blip(path: Path, device: str = "cpu") -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """Return (model, processor) for a BLIP captioning folder, model in eval mode."""
    check_blip_folder(path)
    from transformers import BlipForConditionalGeneration, BlipProcessor

    _quiet_libraries()
    with _user_errors(path, "a BLIP captioner"):
        model = BlipForConditionalGeneration.from_pretrained(path, use_safetensors=True)
        processor = BlipProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def copy_sd(src: Path, out_dir: Path) -> None:
    """Materialise a canonical SD pipeline folder (no safety checker, no feature extractor) from `src`."""
    load_sd_pipeline(src).save_pretrained(out_dir, safe_serialization=True)


def copy_clip(src: Path, out_dir: Path) -> None:
    """Materialise a canonical open_clip folder (config + open_clip_model.safetensors) from `src`."""
    model, _, _ = load_clip(src)
    config = _read_json(src / CLIP_CONFIG)
    _write_open_clip(out_dir, config, model.state_dict())
    if config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name"):
        # open_clip then reads an HF tokenizer from the folder itself.
        for name in CLIP_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)


def copy_blip(src: Path, out_dir: Path) -> None:
    """Materialise a canonical BLIP captioning folder (model.safetensors + processor files) from `src`."""
    model, processor = load_blip(src)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
