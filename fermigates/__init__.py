"""fermigates: convert a PyTorch model in place to Fermi-gated layers, anneal, and bake it smaller.

Public API::

    convert_to_fermi(model, FermiConfig(...))      # in place, returns the model
    FermiAnnealer(optimizer, model, total_steps)   # wraps any torch optimizer
    convert_from_fermi(model, calibration_data=...)  # bake, shrink, calibrate -> FermiReport
"""

from . import converters  # noqa: F401  (registers the family converters; imports no timm/transformers)
from .methods.fermi.anneal import AnnealSchedule, FermiAnnealer, sparsity_at, temperature_at
from .calibration.engine import CalibrationError, CalibrationReport, calibrate
from .bake import convert_from_fermi
from .methods.fermi.model import disable_gates, hard_gates
from .config import FermiConfig, load_recipe
from .state import ConversionSummary, summary
from .convert import convert_to_fermi
from .surgery.fold import BatchNormFold, fold_batchnorm
from .methods.fermi.gates import FermiGate, fermi_probability
from .surgery.graph import ChannelGroup, DependencyGraph, GroupMember, build_dependency_graph
from .io.checkpoint import (
    CheckpointError,
    CheckpointSummary,
    from_pretrained,
    inspect_checkpoint,
    load_shrunk,
    save_shrunk,
)
from .methods.fermi.layers import FermiConv1d, FermiConv2d, FermiConv3d, FermiLinear
from .io.onnx import export_onnx
from .prune import prune
from .methods.fermi.refine import RefineResult, refine_gates
from .surgery.shrink import ModuleChange, ShrinkResult, mask_model, shrink_model
from .surgery.macs import count_macs
from .report import FermiReport, SparsityReport, compute_sparsity, count_parameters

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CalibrationReport",
    "calibrate",
    "ChannelGroup",
    "DependencyGraph",
    "GroupMember",
    "ModuleChange",
    "ShrinkResult",
    "build_dependency_graph",
    "count_macs",
    "mask_model",
    "shrink_model",
    "CheckpointError",
    "CheckpointSummary",
    "export_onnx",
    "from_pretrained",
    "inspect_checkpoint",
    "load_shrunk",
    "save_shrunk",
    "AnnealSchedule",
    "BatchNormFold",
    "fold_batchnorm",
    "ConversionSummary",
    "FermiAnnealer",
    "FermiConfig",
    "FermiConv1d",
    "FermiConv2d",
    "FermiConv3d",
    "FermiGate",
    "FermiLinear",
    "FermiReport",
    "SparsityReport",
    "compute_sparsity",
    "convert_from_fermi",
    "convert_to_fermi",
    "count_parameters",
    "disable_gates",
    "fermi_probability",
    "hard_gates",
    "load_recipe",
    "prune",
    "refine_gates",
    "RefineResult",
    "sparsity_at",
    "summary",
    "temperature_at",
]
