"""The shared code of the study's DVC stages (stages/): data, models and their families, training, evaluation, report.

core/      params.yaml (validation, the command line every stage shares) and outputs written whole
data/      the canonical dataset (imagefolder + metadata.jsonl), sources, synthetic sketches, the split, encodings
models/    model folders (check, load, copy), random builders, the Hub, one module per model family
train/     building a fine-tune, batches, losses, LoRA, checkpoints and resume, processes, validation, model card
evaluate/  samples and manifests, CLIP embeddings, statistics (intervals, tests, KID, CMMD)
report/    figures and the results page
"""
