"""Load expert checkpoints once and share their tensors: safetensors folders, PEFT adapters, GGUF."""

from mergeserve.experts.checkpoint import Checkpoint, CheckpointError
from mergeserve.experts.pool import ExpertPool

__all__ = ["Checkpoint", "CheckpointError", "ExpertPool"]
