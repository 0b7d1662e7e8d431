"""Fine-tuning: building a run, batches, losses, LoRA, checkpoints, processes, validation, the model card."""
