"""Random models built from configs, saved as the folders `stylestudy/models/loading.py` loads.

`tiny` architectures serve the offline smoke setting; `full` ones are the study's exact shapes (speed and memory at
study scale without the Hub). Every builder seeds its own RNG and logs parameter counts so shapes can be checked.
"""
from __future__ import annotations

import functools
import gzip
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylestudy.models.loading import quiet_libraries, write_open_clip

if TYPE_CHECKING:
    from transformers import BlipConfig, CLIPTokenizer

log = logging.getLogger(__name__)

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


def sd_tokenizer_from_open_clip() -> CLIPTokenizer:
    """A CLIPTokenizer equal to SD2's, built offline from the BPE vocabulary that ships inside open_clip."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    quiet_libraries()
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # the slice open_clip and SD2 use
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    # SD2 pads with "!" (id 0); without model_max_length the tokenizer would pad to 1e30.
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token="!",
                         model_max_length=77)


# Architectures of the random models: "tiny" for the offline smoke setting, "full" for the study's exact shapes
# (stabilityai/stable-diffusion-2-base's unet/, vae/ and text_encoder/ config.json; OpenCLIP ViT-H-14). The tiny VAE
# downsamples 4x (SD's 8x): 32 px images give 8x8 latents, on which the tiny UNet trains 1.7x as fast as on 16x16.
SD_ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": {"sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 64),
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
                 "attention_head_dim": 8},
        "vae": {"layers_per_block": 1, "block_out_channels": (32, 64, 64), "sample_size": 32},
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
# The guidance CLIP of the smoke setting: another shape (and seed) than the scoring one, so neither stands in for the other.
GUIDE_TINY = {"embed_dim": 24,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 24, "head_width": 12, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 1}}
GUIDE_SEED_OFFSET = 1000
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


def sd_vae(config: dict[str, Any], latent_channels: int = 4, **family: Any) -> Any:
    """An AutoencoderKL of Stable Diffusion's design (one encoder and one decoder block per width of `config`, whose
    layers_per_block, block_out_channels and sample_size it takes), randomly initialised; `family` adds a family's own
    settings (shift and scale, no quant convolutions, fp32 upcast)."""
    from diffusers import AutoencoderKL

    blocks = len(config["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, **config, **family)


def build_sd_modules(arch: str) -> dict[str, Any]:
    """The UNet, VAE and text encoder of `arch`, randomly initialised (inside `torch.device("meta")`: shapes only)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    quiet_libraries()
    config = SD_ARCHITECTURES[arch]
    return {
        "unet": UNet2DConditionModel(**UNET_COMMON, **config["unet"]),
        "vae": sd_vae(config["vae"]),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_COMMON, **config["text_encoder"])),
    }


def save_random_sd(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """Build a random Stable Diffusion pipeline of `arch` from configs, save it as a diffusers folder; return sizes."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = build_sd_modules(arch)
    if arch == "tiny":  # a random decoder ignores its latent: the smoke study could show no style (vae_shaping.py)
        from stylestudy.models.vae_shaping import shape_vae

        shape_vae(modules["vae"], modules["vae"].config.sample_size, seed)
    # SD2-base's scheduler_config.json values.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(**modules, tokenizer=sd_tokenizer_from_open_clip(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return parameter_counts(f"{arch} Stable Diffusion", modules)


def clip_config(arch: str, guide: bool = False) -> dict[str, Any]:
    """The open_clip config (model_cfg + preprocess_cfg) of `arch`; "full" is open_clip's built-in ViT-H-14 for the
    scorer, ViT-B-32 for the guidance CLIP."""
    import open_clip

    if arch == "tiny":
        model_cfg = GUIDE_TINY if guide else CLIP_TINY
    else:
        model_cfg = open_clip.get_model_config("ViT-B-32" if guide else "ViT-H-14")
    size = model_cfg["vision_cfg"]["image_size"]
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                               "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                               "resize_mode": "shortest"}}


def save_random_clip(out_dir: Path, seed: int, arch: str, guide: bool = False) -> dict[str, int]:
    """Build a random open_clip model of `arch` and save it as an open_clip `local-dir:` folder; return its size."""
    import open_clip
    import torch

    config = clip_config(arch, guide)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config["model_cfg"])
    write_open_clip(out_dir, config, model.state_dict())
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

    quiet_libraries()
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
def save_random_guide(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """The guidance CLIP for finetune.clip_loss: another architecture and seed than the scoring CLIP."""
    return save_random_clip(out_dir, seed + GUIDE_SEED_OFFSET, arch, guide=True)


save_tiny_sd = functools.partial(save_random_sd, arch="tiny")
save_tiny_clip = functools.partial(save_random_clip, arch="tiny")
save_tiny_blip = functools.partial(save_random_blip, arch="tiny")
