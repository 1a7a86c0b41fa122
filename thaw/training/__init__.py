"""Training: one loop for all stages (probe, last stage, full fine-tune)."""

from thaw.training.loop import StageResult, train_stage

__all__ = ["StageResult", "train_stage"]
