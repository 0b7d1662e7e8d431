"""Loading, checking and copying the three model folders (SD pipeline, open_clip, BLIP), and random builders.

Folders are canonical library formats, safetensors only: a diffusers `StableDiffusionPipeline` folder, an open_clip
`local-dir:` folder (`open_clip_config.json` + `open_clip_model.safetensors`) and a transformers BLIP captioner
folder. The random builders make them from configs: `tiny` for the offline smoke setting, `full` for the study's
architectures (speed and memory at study scale without the Hub). Heavy libraries are imported inside the functions
so that importing this module stays fast.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from stages.config import UserError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor, CLIPTokenizer

# bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward" while diffusers imports it; users read it as
# an error. Set before any import of it, hence at module level.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
log = logging.getLogger(__name__)

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


# Architectures of the random models: "tiny" for the offline smoke setting, "full" for the study's exact shapes
# (stabilityai/stable-diffusion-2-base's unet/, vae/ and text_encoder/ config.json; OpenCLIP ViT-H-14).
SD_ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": {"sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64),
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
                 "attention_head_dim": 8},
        "vae": {"layers_per_block": 1, "block_out_channels": (32, 64), "sample_size": 32},
        "text_encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
                         "projection_dim": 32},
    },
    "full": {
        "unet": {"sample_size": 64, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
                 "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 1024,
                 "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
        "vae": {"layers_per_block": 2, "block_out_channels": (128, 256, 512, 512), "sample_size": 512},
        "text_encoder": {"hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16,
                         "intermediate_size": 4096, "projection_dim": 512},
    },
}
UNET_COMMON = {"in_channels": 4, "out_channels": 4, "norm_num_groups": 32}
TEXT_COMMON = {"max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "pad_token_id": 0,
               "bos_token_id": 49406, "eos_token_id": 49407}
CLIP_TINY = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}
BLIP_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                  "max_position_embeddings": 512, "projection_dim": 32}
BLIP_TINY_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "image_size": 32, "patch_size": 8, "projection_dim": 32}
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; the real captioner adds [DEC] and [ENC] after it (30524)


def parameter_counts(name: str, modules: dict[str, Any]) -> dict[str, int]:
    """Parameters of each module (shared weights once), logged so that anyone can check the shapes."""
    counts = {key: sum(p.numel() for p in module.parameters()) for key, module in modules.items()}
    log.info("%s parameters: %s", name, ", ".join(f"{key} {n / 1e6:.1f}M ({n:,})" for key, n in counts.items()))
    return counts


def build_sd_modules(arch: str) -> dict[str, Any]:
    """The UNet, VAE and text encoder of `arch`, randomly initialised (inside `torch.device("meta")`: shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    _quiet_libraries()
    config = SD_ARCHITECTURES[arch]
    blocks = len(config["vae"]["block_out_channels"])
    return {
        "unet": UNet2DConditionModel(**UNET_COMMON, **config["unet"]),
        "vae": AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                             down_block_types=("DownEncoderBlock2D",) * blocks,
                             up_block_types=("UpDecoderBlock2D",) * blocks, **config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_COMMON, **config["text_encoder"])),
    }


def save_random_sd(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """Build a random Stable Diffusion pipeline of `arch` from configs, save it as a diffusers folder; return sizes."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = build_sd_modules(arch)
    # SD2-base's scheduler_config.json values.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(**modules, tokenizer=sd_tokenizer_from_open_clip(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return parameter_counts(f"{arch} Stable Diffusion", modules)


def _write_open_clip(out_dir: Path, config: dict[str, Any], state_dict: dict[str, Any]) -> None:
    """Write an open_clip local-dir folder: the JSON config and the weights as safetensors."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out_dir / CLIP_WEIGHTS))


def clip_config(arch: str) -> dict[str, Any]:
    """The open_clip config (model_cfg + preprocess_cfg) of `arch`; "full" is open_clip's built-in ViT-H-14."""
    import open_clip

    model_cfg = CLIP_TINY if arch == "tiny" else open_clip.get_model_config("ViT-H-14")
    size = model_cfg["vision_cfg"]["image_size"]
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                               "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                               "resize_mode": "shortest"}}


def save_random_clip(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """Build a random open_clip model of `arch` and save it as an open_clip `local-dir:` folder; return its size."""
    import open_clip
    import torch

    config = clip_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config["model_cfg"])
    _write_open_clip(out_dir, config, model.state_dict())
    return parameter_counts(f"{arch} CLIP", {"clip": model})


def blip_vocab(arch: str) -> dict[str, int]:
    """The captioner's word-piece vocabulary: a small one, or BERT's layout and size with our words (30524)."""
    words = [*BLIP_WORDS, "##s", "##ing", "##ed"]
    if arch == "tiny":
        return {token: i for i, token in enumerate(dict.fromkeys([*BLIP_SPECIAL, *words]))}
    # Same ids as bert-base-uncased for the special tokens, so BlipConfig's defaults (bos 30522, sep 102) hold.
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokens = head + [f"[unused{i}]" for i in range(99, 99 + BERT_VOCAB_SIZE - len(head))] + ["[DEC]", "[ENC]"]
    return {token: i for i, token in enumerate(tokens)}


def blip_config(arch: str, vocab: dict[str, int]) -> BlipConfig:
    """BlipConfig of `arch`; "full" is BlipConfig's defaults, the shapes of Salesforce/blip-image-captioning-base."""
    from transformers import BlipConfig

    if arch == "full":
        return BlipConfig(text_config={"vocab_size": len(vocab)})
    text = BLIP_TINY_TEXT | {"vocab_size": len(vocab), "pad_token_id": 0, "bos_token_id": vocab["[DEC]"],
                             "eos_token_id": vocab["[SEP]"], "sep_token_id": vocab["[SEP]"]}
    return BlipConfig(text_config=text, vision_config=BLIP_TINY_VISION, projection_dim=32, image_text_hidden_size=32)


def save_random_blip(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """Build a random BLIP captioner of `arch` (BlipForConditionalGeneration + BlipProcessor), save it; return sizes."""
    import torch
    from transformers import BertTokenizer, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    _quiet_libraries()
    vocab = blip_vocab(arch)
    # Like the real captioner: [DEC] starts a caption, [SEP] ends it. BertTokenizerFast(vocab_file=) ignores the file.
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", additional_special_tokens=["[ENC]"], model_max_length=512)
    config = blip_config(arch, vocab)
    size = config.vision_config.image_size
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                              tokenizer=tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return parameter_counts(f"{arch} BLIP", {"blip": model})


# The smoke setting's builders.
save_tiny_sd = functools.partial(save_random_sd, arch="tiny")
save_tiny_clip = functools.partial(save_random_clip, arch="tiny")
save_tiny_blip = functools.partial(save_random_blip, arch="tiny")


def load_sd_pipeline(path: Path) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline folder (safetensors only), after checking it is one."""
    check_sd_folder(path)
    from diffusers import StableDiffusionPipeline

    _quiet_libraries()
    with _user_errors(path, "a Stable Diffusion pipeline"):
        return StableDiffusionPipeline.from_pretrained(
            path, use_safetensors=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def inference_device() -> tuple[Any, Any]:
    """Where inference runs: the device accelerate picks, in fp16 on CUDA and fp32 elsewhere (CPU results unchanged)."""
    import torch
    from accelerate import PartialState

    device = PartialState().device
    return device, torch.float16 if device.type == "cuda" else torch.float32


def load_clip(path: Path, device: Any = "cpu", half: bool = False) -> tuple[Any, Callable, Callable]:
    """Return (model, preprocess, tokenizer) for an open_clip local-dir folder, model in eval mode (fp16 if `half`)."""
    check_clip_folder(path)
    import open_clip

    with _user_errors(path, "an open_clip model"):
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{path}", device=device, precision="fp16" if half else "fp32")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.eval(), preprocess, tokenizer


def load_blip(path: Path, device: Any = "cpu", dtype: Any = None) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """Return (model, processor) for a BLIP captioning folder, model in eval mode, in `dtype` (None: the file's)."""
    check_blip_folder(path)
    from transformers import BlipForConditionalGeneration, BlipProcessor

    _quiet_libraries()
    with _user_errors(path, "a BLIP captioner"):
        model = BlipForConditionalGeneration.from_pretrained(path, use_safetensors=True, dtype=dtype)
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
