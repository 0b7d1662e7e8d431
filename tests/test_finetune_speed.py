"""finetune's step count and speed options on tiny models, and bench/finetune_speed.py at tiny size on the CPU."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from stages import finetune

P = {"gradient_accumulation_steps": 2, "max_train_steps": 0, "epochs": 3, "lr_scheduler": "linear",
     "lr_warmup_steps": 0, "optimizer": "adamw", "learning_rate": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999,
     "adam_weight_decay": 0.0, "adam_epsilon": 1e-8, "use_ema": False, "ema_decay": 0.9}


class TwoProcesses:
    """What accelerate does with two processes: each one gets half of the batches."""

    num_processes = 2

    def prepare(self, *objects):
        prepared = [obj[: len(obj) // 2] if isinstance(obj, list) else obj for obj in objects]
        return prepared[0] if len(prepared) == 1 else prepared


def test_steps_come_from_the_shard_each_process_sees():
    parts = {"unet": torch.nn.Linear(2, 2)}
    loop = finetune.prepare_training(parts, list(range(20)), P, TwoProcesses())
    assert len(loop["dataloader"]) == 10
    assert loop["max_steps"] == 3 * 5  # 10 batches per process, accumulation 2, 3 epochs
    assert loop["lr_scheduler"].lr_lambdas[0](15 * 2) == 0.0  # the schedule ends after two scheduler steps a step
