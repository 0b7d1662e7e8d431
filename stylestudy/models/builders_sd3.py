"""Random Stable Diffusion 3 pipelines built from configs, saved as the folders StableDiffusion3Pipeline loads.

`tiny` serves the offline smoke setting (its transformer 128 wide: a 2x2 patch of 16 latent channels holds 64
numbers, and a narrower one could not carry the noise it must remove); `full` has the shapes of stabilityai/stable-diffusion-3-medium-diffusers (the
2B MMDiT, CLIP-L, OpenCLIP bigG and T5-v1.1-XXL, the 16-channel VAE), saved in fp16 like that repository, for speed and
memory checks on a GPU without the Hub. The T5 tokenizer is a small word-level Unigram model built offline: the real
one's sentencepiece file cannot be made without the Hub, and its ids only index rows of random embeddings here.
`tiny-sd35` and `full-sd35` are the same with SD3.5 Medium's transformer (params fetch.sd.variant: sd35).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stylestudy.models.builders import BLIP_WORDS, parameter_counts, sd_tokenizer_from_open_clip, sd_vae
from stylestudy.models.loading import quiet_libraries

if TYPE_CHECKING:
    from transformers import T5TokenizerFast

CLIP_COMMON = {"max_position_embeddings": 77, "vocab_size": 49408, "pad_token_id": 1, "bos_token_id": 49406,
               "eos_token_id": 49407}
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "transformer": {"sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                        "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64,
                        "caption_projection_dim": 128, "pooled_projection_dim": 64, "pos_embed_max_size": 16},
        "vae": {"layers_per_block": 1, "block_out_channels": (32, 64, 64), "sample_size": 32},
        "text_encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
                         "projection_dim": 32, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 37, "projection_dim": 32, "hidden_act": "gelu"},
        "text_encoder_3": {"d_model": 64, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 2},
    },
    "full": {
        "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
        "vae": {"layers_per_block": 2, "block_out_channels": (128, 256, 512, 512), "sample_size": 1024},
        "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072, "projection_dim": 768, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                           "intermediate_size": 5120, "projection_dim": 1280, "hidden_act": "gelu"},
        "text_encoder_3": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24},
    },
}
# SD3.5 Medium (stabilityai/stable-diffusion-3.5-medium, MMDiT-X): SD3's pipeline with a transformer whose attention
# normalises queries and keys (RMS) and whose first blocks add a second, image-only attention; `<size>-sd35` builds it
SD35_TRANSFORMER = {"tiny": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
                    "full": {"qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13)), "pos_embed_max_size": 384}}
ARCHITECTURES |= {f"{size}-sd35": ARCHITECTURES[size] | {"transformer": ARCHITECTURES[size]["transformer"] | changes}
                  for size, changes in SD35_TRANSFORMER.items()}
SHAPING_STEPS = 80  # SD2's 40 leave the 16-channel decoder reading too little of its latent (docs/study.md "Controls")
T5_COMMON = {"vocab_size": 32128, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
             "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "is_encoder_decoder": False}
T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer (Unigram over words, lower-cased, <pad> 0, </s> 1, <unk> 2) built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [*T5_SPECIAL, *dict.fromkeys("\u2581" + word for word in BLIP_WORDS), *"abcdefghijklmnopqrstuvwxyz"]
    tokenizer = Tokenizer(models.Unigram([(piece, -1.0) for piece in pieces], unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def forked(build: Callable[[], Any]) -> Any:
    """Build from a copy of the random state: what follows draws the same numbers whatever was built (SD3 and SD3.5's
    transformers differ; their VAE and text encoders are the same)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return build()


def build_sd3_modules(arch: str, only: str | None = None) -> dict[str, Any]:
    """The transformer, VAE and three text encoders of `arch` (or the one named `only`), randomly initialised."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    quiet_libraries()
    config = ARCHITECTURES[arch]
    builders = {
        "transformer": lambda: forked(lambda: SD3Transformer2DModel(**config["transformer"])),
        # SD3's VAE: 16 channels, shifted and scaled latents, no quant convolutions
        "vae": lambda: sd_vae(config["vae"], 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                              use_post_quant_conv=False),
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_COMMON, **config["text_encoder"])),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**CLIP_COMMON, **config["text_encoder_2"])),
        "text_encoder_3": lambda: T5EncoderModel(T5Config(**T5_COMMON, **config["text_encoder_3"])),
    }
    return {name: build() for name, build in builders.items() if only in (None, name)}


def save_random_sd3(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """Build a random Stable Diffusion 3 pipeline of `arch` from configs, save it as a diffusers folder; sizes."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = build_sd3_modules(arch)
    if arch.startswith("tiny"):  # as SD2's (builders.save_random_sd): a random decoder ignores its latent
        from stylestudy.models.vae_shaping import shape_vae

        shape_vae(modules["vae"], modules["vae"].config.sample_size, seed, steps=SHAPING_STEPS)
    counts = parameter_counts(f"{arch} Stable Diffusion 3", modules)
    if arch.startswith("full"):
        modules = {name: module.half() for name, module in modules.items()}  # as the Hub repository ships them
    clip_tokenizer = sd_tokenizer_from_open_clip()
    pipe = StableDiffusion3Pipeline(**modules, tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer,
                                    tokenizer_3=t5_tokenizer(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return counts
