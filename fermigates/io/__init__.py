"""Checkpoints (safetensors + manifest), Hugging Face folders, ONNX export and checkpoint inspection."""

from .checkpoint import CheckpointError, CheckpointSummary, from_pretrained, inspect_checkpoint, load_shrunk, save_shrunk
from .onnx import export_onnx

__all__ = [
    "CheckpointError", "CheckpointSummary", "export_onnx", "from_pretrained", "inspect_checkpoint", "load_shrunk",
    "save_shrunk",
]
