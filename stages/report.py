"""report: the study's results as a page a reader can use: headline numbers first, then charts, grids and settings.

Reads params.yaml (the settings that ran) and conf/config.yaml (the study's defaults, to show what differs),
SAMPLES_DIR, the metrics and detail tables of split, finetune (its dvclive folder), clip_eval and blip_check, a few
training sketches (RAW_DIR, SPLIT_DIR/train.jsonl) and params `report`; dvc.yaml passes every path. Writes OUT_MD
(Markdown) and FIGURES_DIR (matplotlib
charts: loss and validation loss, CLIP score per prompt, distances to real sketches; a grid per study prompt, base row
above fine-tuned row (and a Versatile Diffusion row below when generate@vd ran), the prompt written above; training
examples), declared in dvc.yaml as image plots. A baseline that ran adds a column to the headline table.

Run: python -m stages.report SAMPLES_DIR SPLIT_JSON FINETUNE_DIR CLIP_JSON CLIP_DIR BLIP_JSON BLIP_DIR RAW_DIR SPLIT_DIR
     STUDY_CONF OUT_MD FIGURES_DIR (params.yaml is validated whole first)
Example: python -m stages.report reports/samples reports/split.json reports/finetune reports/clip_eval.json \
    reports/clip_eval reports/blip_check.json reports/blip_check data/raw data/split conf/config.yaml \
    reports/report.md reports/figures
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from stylestudy.data import dataset
from stylestudy.report import figures, results
from stylestudy.core.config import PARAMS_FILE, cli, load_params, parse_args, require_path
from stylestudy.evaluate.samples import MODELS, of_set, read_samples
from stylestudy.core.outputs import atomic_dir, atomic_file, fetch_origin, read_csv

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Inputs:
    """What the report reads, as dvc.yaml passes it."""

    samples: Path
    split_metrics: Path
    finetune: Path  # the dvclive folder: metrics.json and plots/metrics/<name>.tsv
    clip_metrics: Path
    clip_tables: Path
    blip_metrics: Path
    blip_tables: Path
    raw: Path
    split: Path
    study_config: Path


def read_curve(finetune: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of one dvclive metric; empty when it was never logged (validation off)."""
    path = finetune / "plots" / "metrics" / f"{name}.tsv"
    if name == "loss":
        require_path(path, "run the finetune stage first")
    if not path.is_file():
        return []
    with path.open() as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle, delimiter="\t")]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def grid_name(index: int, prompt: str) -> str:
    return f"grid_{index + 1}_{slug(prompt)}.png"


def write_figures(study_rows: dict[str, list[dict]], inputs: Inputs, examples: list[dict], figures_dir: Path,
                  metrics: dict) -> None:
    """Every chart and grid the report shows, written whole into figures_dir."""
    prompts = list(dict.fromkeys(r["prompt"] for r in study_rows[MODELS[0]]))
    with atomic_dir(figures_dir) as tmp:
        figures.loss_chart(read_curve(inputs.finetune, "loss"), read_curve(inputs.finetune, "val_loss"),
                           tmp / "loss.png")
        prompt_rows = [row | {k: float(row[k]) for k in ("clip_score", "ci_low", "ci_high")}
                       for row in read_csv(inputs.clip_tables / "per_prompt.csv")]
        figures.clip_per_prompt_chart(prompt_rows, tmp / "clip_per_prompt.png")
        if "kid_base" in metrics:
            figures.distance_chart(metrics, tmp / "distances.png")
        for i, prompt in enumerate(prompts):
            images = {m: [dataset.load_rgb(r["path"]) for r in rows if r["prompt"] == prompt]
                      for m, rows in study_rows.items()}
            figures.prompt_grid(images, prompt).save(tmp / grid_name(i, prompt))
        if examples:
            sketches = [dataset.load_rgb(inputs.raw / row["file_name"]) for row in examples]
            figures.training_examples(sketches, [row["text"] for row in examples]).save(tmp / "training_examples.png")


def load_metrics(path: Path) -> dict:
    return json.loads(require_path(path, f"run the stage that writes {path.name}").read_text())


def results_section(params: dict, metrics: dict, scorer: dict, figures_rel: str, noun: str) -> list[str]:
    """Warnings, the headline table, which CLIP produced the numbers, the distance chart; `noun`: what the dataset's
    images are (sketches, real images)."""
    line, study_score = results.study_line(params)
    clip = scorer["clip"]
    verdicts = results.distance_verdict(metrics, noun), results.diversity_verdict(metrics, noun)
    parts = ["## Results", " ".join(filter(None, verdicts)), *results.warnings(params, metrics, noun),
             results.headline_table(metrics, study_score, noun),
             line + " Compare CLIP scores only at equal generation settings and with the same CLIP model.",
             f"Scored by the CLIP `{clip['name']}` (image tower: {clip['vision']}; embeddings of {clip['embed_dim']} "
             f"dimensions): it produced every CLIP score and every row in CLIP features above. Intervals are 95% "
             f"bootstrap percentile intervals (BLIP shares: Wilson); p: paired sign-flip permutation test (CLIP), "
             f"McNemar's exact test (BLIP). KID, CMMD and style similarity compare all {scorer['images_per_model']} "
             f"images a model generated with the {scorer['n_real_sketches']} {noun} of the test split.",
             *([CSD_CAVEAT.format(name=scorer["csd"]["name"])] if "csd" in scorer else [])]
    if "kid_base" in metrics:
        parts.append(f"![distances to the held-out {noun}]({figures_rel}/distances.png)")
    return parts


def captions_section(blip_tables: Path, p: dict) -> list[str]:
    captions = read_csv(require_path(blip_tables / "captions.csv", "run blip_check first"))
    parts = ["## Sample BLIP captions (study prompts)"]
    for model in dict.fromkeys([*MODELS, *(row["model"] for row in captions)]):
        sample = [row for row in captions if row["model"] == model and row["set"] == "study"][: p["captions_per_model"]]
        parts.append(f"**{model}**\n\n" + "\n".join(f"- {row['prompt']}: *{row['caption']}*" for row in sample))
    return parts


def markdown(params: dict, inputs: Inputs, study_rows: dict, figures_rel: str, p: dict, examples: bool,
             clip_metrics: dict) -> str:
    """The report text: results first, settings last."""
    metrics = clip_metrics | load_metrics(inputs.blip_metrics)
    scorer = json.loads((inputs.clip_tables / "scorer.json").read_text())
    prompts = list(dict.fromkeys(r["prompt"] for r in study_rows[MODELS[0]]))
    training = load_metrics(inputs.finetune / "metrics.json")
    split = load_metrics(inputs.split_metrics)
    family = params["model"]["family"]
    noun = dataset.images_noun(fetch_origin(inputs.raw))
    parts = [f"# Sketch-style fine-tune of {FAMILY_TITLES[family]}: results ({params['shared']['profile']} profile, "
             f"model family {family})",
             *results_section(params, metrics, scorer, figures_rel, noun),
             "## CLIP score per prompt (study prompts)", f"![CLIP score per prompt]({figures_rel}/clip_per_prompt.png)",
             grids_heading(study_rows)]
    if examples:
        parts.append(f"![training images]({figures_rel}/training_examples.png)")
    parts += [f"![{prompt}]({figures_rel}/{grid_name(i, prompt)})" for i, prompt in enumerate(prompts)]
    parts += ["## Training", f"![loss]({figures_rel}/loss.png)",
              results.table(["at the last logged step", "loss", "val_loss"],
                            [[str(training["step"]), results.number(training["loss"]),
                              results.number(training["val_loss"]) if "val_loss" in training else "-"]]),
              f"Data: {split['n_train']} training, {split['n_val']} validation and {split['n_test']} test {noun}; "
              f"{split['n_skipped']} of {split['n_examples']} examples skipped (data/split/skipped.csv).",
              *captions_section(inputs.blip_tables, p),
              "## Settings that differ from the study's",
              results.settings_table(params, study_defaults(inputs.study_config))
              + "\n\nEvery setting: [params.yaml](../params.yaml)."]
    return "\n\n".join(parts) + "\n"


# CSD's known limits, said where its rows are read (docs/evaluation.md "Style measured by a style model")
CSD_CAVEAT = ("The rows \"in CSD's style space\" measure the same distances with {name}, a model trained to embed "
              "style apart from content (Somepalli et al. 2024), instead of CLIP. Its authors note that the released "
              "weights do not reproduce every number of their paper, and an open issue of theirs reports them below "
              "CLIP ViT-L on their own benchmark: read them beside CLIP's rows, not instead of them.")
FAMILY_TITLES = {"sd2": "Stable Diffusion 2", "sd3": "Stable Diffusion 3", "sdxl": "Stable Diffusion XL",
                 "flux": "FLUX.1 [dev]"}


def grids_heading(study_rows: dict) -> str:
    """What the rows of each grid are: base over fine-tuned, and the baselines that ran below them."""
    if set(study_rows) == set(MODELS):
        return "## Before and after: base (top row) and fine-tuned (bottom row), the same seeds"
    others = ", ".join(results.BASELINE_TITLES[model] for model in study_rows if model not in MODELS)
    return (f"## Before and after: base (top row), fine-tuned (second row) and, below, {others}: "
            "the same prompts and seeds")


def study_defaults(study_config: Path) -> dict:
    """The study's settings: conf/config.yaml with the groups its defaults list names (conf/model/sd2.yaml,
    conf/profile/study.yaml) merged in order, its interpolations (finetune.seed: ${shared.seed}) resolved as Hydra
    composes them."""
    from omegaconf import OmegaConf

    config = yaml.safe_load(study_config.read_text())
    merged = OmegaConf.create({k: v for k, v in config.items() if k != "defaults"})
    chosen: dict[str, str] = {}
    for entry in config.get("defaults", []):
        if isinstance(entry, dict):
            (group, name), = entry.items()
            group, optional = group.removeprefix("optional "), group.startswith("optional ")
            name = chosen[group] = re.sub(r"\$\{(\w+)\}", lambda m: chosen[m.group(1)], name)  # ${model}_${profile}
            group_file = study_config.parent / group / f"{name}.yaml"
            if optional and not group_file.is_file():
                continue  # conf/model_profile/ has no file for the study's profile and model
            merged = OmegaConf.merge(merged, yaml.safe_load(group_file.read_text()) or {})
    return OmegaConf.to_container(merged, resolve=True)


def run(inputs: Inputs, out_md: Path, figures_dir: Path, p: dict) -> None:
    """Write the figures and the Markdown report."""
    params = yaml.safe_load(PARAMS_FILE.read_text())
    study_rows = {m: of_set(rows, "study") for m, rows in read_samples(inputs.samples).items()}
    train = dataset.read_jsonl(require_path(inputs.split / "train.jsonl", "run the split stage first"))
    examples = train[:p["training_examples"]]
    metrics = load_metrics(inputs.clip_metrics)
    write_figures(study_rows, inputs, examples, figures_dir, metrics)
    text = markdown(params, inputs, study_rows, os.path.relpath(figures_dir, out_md.parent), p, bool(examples),
                    metrics)
    with atomic_file(out_md) as tmp:
        tmp.write_text(text)
    log.info("report written to %s", out_md)


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "samples": "the folder holding base/ and finetuned/ samples (reports/samples)",
        "split_metrics": "the split stage's counts (reports/split.json)",
        "finetune": "the fine-tune's dvclive folder (reports/finetune)",
        "clip_metrics": "clip_eval's metrics (reports/clip_eval.json)",
        "clip_tables": "clip_eval's tables (reports/clip_eval)",
        "blip_metrics": "blip_check's metrics (reports/blip_check.json)",
        "blip_tables": "blip_check's captions (reports/blip_check)",
        "raw": "the imagefolder fetched, for a few training sketches (data/raw)",
        "split": "the split folder whose train.jsonl names them (data/split)",
        "study_config": "the study's settings, to show what differs (conf/config.yaml)",
        "out_md": "the Markdown report to write (reports/report.md)",
        "figures": "the folder for the report's figures (reports/figures)",
    })
    paths = vars(args)
    out_md, figures_dir = paths.pop("out_md"), paths.pop("figures")
    run(Inputs(**paths), out_md, figures_dir, load_params("report"))


if __name__ == "__main__":
    main()
