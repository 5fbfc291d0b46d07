"""Fine-tuning: unfreeze a backbone's top blocks, train them with a head, write a tuned weights file."""

from imgfeat.finetune.train import FinetuneConfig, FinetuneSummary, finetune_dir, run_finetune

__all__ = ["FinetuneConfig", "FinetuneSummary", "finetune_dir", "run_finetune"]
