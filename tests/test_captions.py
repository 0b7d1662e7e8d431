"""Captions longer than the text encoder's 77 tokens are truncated and counted, not refused."""
from stylestudy.data import latents
from stylestudy.models import builders
from stylestudy.models.families import FrozenEncoders, sd2


def test_long_captions_are_counted(caplog):
    caplog.set_level("INFO", logger="stylestudy.data.latents")
    tokenizer = builders.sd_tokenizer_from_open_clip()
    encoders = FrozenEncoders(sd2.FAMILY, vae=None, tokenizers=(tokenizer,), text_encoders=(), device="cpu", dtype=None)
    short = "a man standing next to a tree"
    fits = " ".join(["tree"] * 75)  # 75 words + start + end = 77 tokens: fits exactly
    too_long = " ".join(["tree"] * 76)
    assert latents.count_truncated(encoders, [short, fits]) == 0
    assert latents.count_truncated(encoders, [short, too_long, fits, too_long + " house"]) == 2
    assert "2 of 4 captions are longer than the text encoder reads: they are truncated" in caplog.text
