"""The report's results in words and tables: headline numbers as "mean [95% CI], n", the study's published numbers
beside ours, warnings a reader needs (random models, small samples), and the settings that differ from the study."""
from __future__ import annotations

from dataclasses import dataclass

# The study's published mean CLIP scores (100 x cosine), by where the style pre-prompt went.
STUDY_EXPERIMENTS = {
    (True, True): ("experiment 1: style pre-prompt to the generator and to CLIP", 36.48),
    (False, True): ("experiment 2: style pre-prompt to CLIP only", 33.58),
}
RANDOM_PROFILES = {"smoke": "tiny randomly initialised models", "full": "randomly initialised study-size models"}
# Below this many images per set, KID and CMMD move more between resamples than between models (their intervals
# show it): read them as a smoke signal, not a measurement.
STABLE_N = 100
# Generators beside the pair (stylestudy/evaluate/samples.py BASELINES), as the report names them.
BASELINE_TITLES = {"vd": "Versatile Diffusion (not fine-tuned)"}


@dataclass(frozen=True)
class Row:
    """One headline row: a metric family (e.g. clip_score), its label and unit, and the file its keys are in."""

    key: str
    label: str
    unit: str


CLIP_ROWS = [Row("clip_score", "CLIP score, the study's prompts", "100 x cos"),
             Row("test_clip_score", "CLIP score, held-out test captions", "100 x cos")]
BLIP_ROWS = [Row("style_share", "BLIP captions naming the style, the study's prompts", "share"),
             Row("test_style_share", "BLIP captions naming the style, held-out test captions", "share")]
# {noun}: what the dataset's images are called (stylestudy/data/dataset.py images_noun): sketches, real images
DISTANCE_ROWS = [Row("kid", "KID to the held-out {noun} (lower: closer)", "MMD², CLIP features"),
                 Row("cmmd", "CMMD to the held-out {noun} (lower: closer)", "x1000, CLIP features"),
                 Row("style_similarity", "Style similarity to the centroid of the held-out {noun} (higher: closer)",
                     "100 x cos, CLIP features")]
# The same distances in the style embedder's space (CSD, stylestudy/models/csd.py): *_csd_* keys
CSD_ROWS = [Row(f"{row.key}_csd", row.label.replace(" (", " in CSD's style space (", 1), "CSD style features")
            for row in DISTANCE_ROWS]
DIVERSITY_ROWS = [Row("diversity_vendi", "Vendi score: how varied a model's images are (effective number of distinct "
                      "images)", "CLIP features"),
                  Row("diversity_pairwise_distance", "Mean pairwise cosine distance between a model's images",
                      "1 - cos")]


def number(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def with_ci(metrics: dict, name: str) -> str:
    """ "mean [low, high], n=N" for a metric with _ci_low/_ci_high/_n companions; "-" when it is absent."""
    if name not in metrics:
        return "-"
    text = number(metrics[name])
    if f"{name}_ci_low" in metrics:
        text += f" [{number(metrics[f'{name}_ci_low'])}, {number(metrics[f'{name}_ci_high'])}]"
    return text + (f", n={metrics[f'{name}_n']}" if f"{name}_n" in metrics else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def baselines_in(metrics: dict) -> list[str]:
    """The baseline generators (BASELINE_TITLES) that have metrics: the ones that ran."""
    return [name for name in BASELINE_TITLES if f"clip_score_{name}" in metrics]


def headline_table(metrics: dict, study_score: float | None, noun: str = "sketches") -> str:
    """Base, fine-tuned, each baseline that ran (a column after fine-tuned), the difference and its p-value for every
    metric family present; the study's score beside the CLIP row of its prompts."""
    rows, baselines = [], baselines_in(metrics)
    for row in CLIP_ROWS + BLIP_ROWS + DISTANCE_ROWS + CSD_ROWS + DIVERSITY_ROWS:
        if f"{row.key}_base" not in metrics:
            continue
        p_value = metrics.get(f"{row.key}_diff_p")
        published = f"{study_score}" if row.key == "clip_score" and study_score is not None else ""
        rows.append([row.label.format(noun=noun), row.unit, with_ci(metrics, f"{row.key}_base"),
                     with_ci(metrics, f"{row.key}_finetuned"),
                     *(with_ci(metrics, f"{row.key}_{name}") for name in baselines),
                     with_ci(metrics, f"{row.key}_diff"), "-" if p_value is None else number(p_value), published])
    return table(["metric", "unit", "base", "fine-tuned", *(BASELINE_TITLES[name] for name in baselines),
                  "fine-tuned - base", "p", "study (published)"], rows)


def study_line(params: dict) -> tuple[str, float | None]:
    """Which of the study's experiments this run repeats, and the mean CLIP score the study published for it."""
    where = (params["generate"]["style_to_generator"], params["clip_eval"]["style_to_clip"])
    if where not in STUDY_EXPERIMENTS:
        return ("This run is neither of the study's experiments (the style pre-prompt goes to CLIP in both), so no "
                "published number stands beside it."), None
    name, score = STUDY_EXPERIMENTS[where]
    return (f"This run repeats the study's {name}, for which it published a mean CLIP score of {score} (fine-tuned, "
            "5 prompts x 6 images, its CLIP model unnamed)."), score


def warnings(params: dict, metrics: dict, noun: str = "sketches") -> list[str]:
    """Lines a reader must see before the numbers: random models, small samples, a skipped comparison."""
    lines = []
    profile = params["shared"]["profile"]
    if profile in RANDOM_PROFILES:
        lines.append(f"**These numbers come from {RANDOM_PROFILES[profile]} (profile `{profile}`): they test the "
                     "pipeline and the evaluation (the smoke study's controls: docs/study.md), and mean nothing about "
                     "a real model's style.**")
    if "kid_base" not in metrics:
        lines.append(f"The distances to the held-out {noun} are skipped: {metrics.get('n_real_sketches', 0)} "
                     f"{noun} of the test split were embedded, fewer than the 2 they need.")
    else:
        n = min(metrics["n_real_sketches"], metrics["kid_base_n"])
        if n < STABLE_N:
            lines.append(f"KID and CMMD rest on {n} images per set (fewer than {STABLE_N}): read their intervals, "
                         "not the point values; the CMMD paper used 30,000.")
    return lines


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested params as flat dotted keys: {"finetune": {"epochs": 2}} -> {"finetune.epochs": 2}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_table(params: dict, study: dict) -> str:
    """The settings whose values differ from the study's defaults, with both values."""
    ran, defaults = flatten(params), flatten(study)
    rows = [[f"`{key}`", f"`{value}`", f"`{defaults.get(key, '(none)')}`"]
            for key, value in ran.items() if defaults.get(key) != value]
    if not rows:
        return "Every setting is the study's."
    return table(["setting", "this run", "study default"], rows)


# Which sign of fine-tuned - base means "closer to the real sketches", per distance metric.
CLOSER_SIGN = {"style_similarity": 1, "kid": -1, "cmmd": -1}


def distance_verdict(metrics: dict, noun: str = "sketches") -> str:
    """One sentence on whether the fine-tuned model's images moved toward the held-out sketches: closer (or further)
    when every distance's 95% interval excludes zero on that side, else that the evaluation cannot tell."""
    if "kid_diff" not in metrics:
        return f"No distance to the held-out {noun} was measured (too few in the test split)."
    sides = {name: sign * (metrics[f"{name}_diff_ci_low"] > 0) - sign * (metrics[f"{name}_diff_ci_high"] < 0)
             for name, sign in CLOSER_SIGN.items()}
    figures = "; ".join(f"{name.replace('_', ' ')} {with_ci(metrics, f'{name}_diff')}"
                        + (f", p={number(metrics[f'{name}_diff_p'])}" if f"{name}_diff_p" in metrics else "")
                        for name in CLOSER_SIGN)
    if all(side == 1 for side in sides.values()):
        return (f"**The fine-tuned model's images are closer to the held-out {noun} than the base model's: every "
                f"distance's 95% interval excludes zero** (fine-tuned - base: {figures}).")
    if all(side == -1 for side in sides.values()):
        return (f"**The fine-tuned model's images are further from the held-out {noun} than the base model's** "
                f"(fine-tuned - base: {figures}).")
    return ("**The evaluation cannot tell the fine-tuned model's images from the base model's in distance to the "
            f"held-out {noun}: not every 95% interval excludes zero on one side** (fine-tuned - base: {figures}).")


def diversity_verdict(metrics: dict, noun: str = "sketches") -> str:
    """One sentence on how varied the fine-tuned model's images are (Vendi score): significantly less than the base
    model's and the real images' (a collapse: a fine-tune that draws the same few images can still move every
    distance), less than one of them, or as varied as the real images (neither interval below zero)."""
    if "diversity_vendi_diff" not in metrics:
        return ""
    fewer_than_base = metrics["diversity_vendi_diff_ci_high"] < 0
    fewer_than_real = metrics["diversity_vendi_real_diff_ci_high"] < 0
    figures = (f"Vendi score fine-tuned - base {with_ci(metrics, 'diversity_vendi_diff')}, "
               f"fine-tuned - real {with_ci(metrics, 'diversity_vendi_real_diff')}")
    if fewer_than_base and fewer_than_real:
        return ("**But it collapsed: its images are significantly less varied than the base model's and than the "
                f"held-out {noun}** ({figures}).")
    if fewer_than_base:
        return (f"Its images are significantly less varied than the base model's, not than the held-out {noun} "
                f"({figures}).")
    if fewer_than_real:
        return (f"Its images are significantly less varied than the held-out {noun}, not than the base model's "
                f"({figures}).")
    return f"Its images are as varied as the held-out {noun}: no interval lies below zero ({figures})."
