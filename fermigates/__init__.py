"""fermigates: convert a PyTorch model in place to Fermi-gated layers, anneal, and bake it smaller.

Public API::

    convert_to_fermi(model, FermiConfig(...))      # in place, returns the model
    FermiAnnealer(optimizer, model, total_steps)   # wraps any torch optimizer
    convert_from_fermi(model, calibration_data=...)  # bake, shrink, calibrate -> FermiReport
"""

from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so that ``import fermigates`` -- and ``fermigates --help`` -- do
# not pay for torch until something needs it. The family converters register themselves the first time the
# library looks up per-family knowledge (fermigates.core.registry.load_families).
if TYPE_CHECKING:
    from .methods.fermi.anneal import AnnealSchedule, FermiAnnealer, sparsity_at, temperature_at
    from .calibration.engine import CalibrationError, CalibrationReport, calibrate
    from .bake import convert_from_fermi
    from .methods.fermi.model import disable_gates, freeze_decisions, gates_open, hard_gates
    from .finetune import TrainLog, fine_tune
    from .methods.fermi.trainer import fermi_trainer_callback
    from .config import FermiConfig
    from .recipe import Recipe, RecipeError, list_recipes, load_recipe
    from .report_plot import write_report
    from .core.state import ConversionSummary, summary
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
    from .oneshot import prune
    from .allocation.budget import Budget, BudgetResult
    from .methods.fermi.refine import RefineResult, refine_gates
    from .methods.base import Method
    from .methods.registry import get_method, make_optimizer, register_method
    from .methods.rewire.config import RewireConfig
    from .methods.rewire.layers import RewiredConv1d, RewiredConv2d, RewiredConv3d, RewiredLinear
    from .methods.rewire.model import rewire_param_groups
    from .methods.rewire.optim import DEEPR, SoftDEEPR
    from .methods.spectral.layers import SpectralLinear
    from .methods.spectral.optim import SpectralOptimizer, spectral_parameters, spectral_trainable
    from .methods.spectral.options import SpectralOptions
    from .methods.spectral.workflows import SpectralResult, spectral_distill, spectral_pretrain, spectral_prune
    from .methods.activation.anneal import ActivationAnnealer
    from .methods.activation.model import set_alpha
    from .methods.activation.options import ActivationOptions
    from .methods.activation.units import PaActivation, PaGELU, PaGLU, PaGTU, PaMishU, PaReGLU, PaSwishU, PaUnit
    from .surgery.merge import BorderBiasConv2d, MergeReport, MergeRequest, merge_layers
    from .surgery.shrink import ModuleChange, ShrinkResult, mask_model, shrink_model
    from .surgery.macs import count_macs
    from .report import FermiReport, SparsityReport, compute_sparsity, count_parameters
    from .metrics import PerplexityResult, perplexity
    from .surgery.depth import RemovedBlocks, block_importance, remove_blocks

_EXPORTS: dict[str, str] = {
    "AnnealSchedule": ".methods.fermi.anneal",
    "FermiAnnealer": ".methods.fermi.anneal",
    "sparsity_at": ".methods.fermi.anneal",
    "temperature_at": ".methods.fermi.anneal",
    "CalibrationError": ".calibration.engine",
    "CalibrationReport": ".calibration.engine",
    "calibrate": ".calibration.engine",
    "convert_from_fermi": ".bake",
    "disable_gates": ".methods.fermi.model",
    "hard_gates": ".methods.fermi.model",
    "gates_open": ".methods.fermi.model",
    "freeze_decisions": ".methods.fermi.model",
    "fine_tune": ".finetune",
    "TrainLog": ".finetune",
    "fermi_trainer_callback": ".methods.fermi.trainer",
    "FermiConfig": ".config",
    "Recipe": ".recipe",
    "RecipeError": ".recipe",
    "list_recipes": ".recipe",
    "load_recipe": ".recipe",
    "write_report": ".report_plot",
    "ConversionSummary": ".core.state",
    "summary": ".core.state",
    "convert_to_fermi": ".convert",
    "BatchNormFold": ".surgery.fold",
    "fold_batchnorm": ".surgery.fold",
    "FermiGate": ".methods.fermi.gates",
    "fermi_probability": ".methods.fermi.gates",
    "ChannelGroup": ".surgery.graph",
    "DependencyGraph": ".surgery.graph",
    "GroupMember": ".surgery.graph",
    "build_dependency_graph": ".surgery.graph",
    "CheckpointError": ".io.checkpoint",
    "CheckpointSummary": ".io.checkpoint",
    "from_pretrained": ".io.checkpoint",
    "inspect_checkpoint": ".io.checkpoint",
    "load_shrunk": ".io.checkpoint",
    "save_shrunk": ".io.checkpoint",
    "FermiConv1d": ".methods.fermi.layers",
    "FermiConv2d": ".methods.fermi.layers",
    "FermiConv3d": ".methods.fermi.layers",
    "FermiLinear": ".methods.fermi.layers",
    "export_onnx": ".io.onnx",
    "prune": ".oneshot",
    "Budget": ".allocation.budget",
    "BudgetResult": ".allocation.budget",
    "RefineResult": ".methods.fermi.refine",
    "refine_gates": ".methods.fermi.refine",
    "Method": ".methods.base",
    "get_method": ".methods.registry",
    "make_optimizer": ".methods.registry",
    "register_method": ".methods.registry",
    "RewireConfig": ".methods.rewire.config",
    "RewiredConv1d": ".methods.rewire.layers",
    "RewiredConv2d": ".methods.rewire.layers",
    "RewiredConv3d": ".methods.rewire.layers",
    "RewiredLinear": ".methods.rewire.layers",
    "rewire_param_groups": ".methods.rewire.model",
    "DEEPR": ".methods.rewire.optim",
    "SoftDEEPR": ".methods.rewire.optim",
    "SpectralLinear": ".methods.spectral.layers",
    "SpectralOptimizer": ".methods.spectral.optim",
    "spectral_parameters": ".methods.spectral.optim",
    "spectral_trainable": ".methods.spectral.optim",
    "SpectralOptions": ".methods.spectral.options",
    "SpectralResult": ".methods.spectral.workflows",
    "spectral_distill": ".methods.spectral.workflows",
    "spectral_pretrain": ".methods.spectral.workflows",
    "spectral_prune": ".methods.spectral.workflows",
    "ActivationAnnealer": ".methods.activation.anneal",
    "set_alpha": ".methods.activation.model",
    "ActivationOptions": ".methods.activation.options",
    "PaActivation": ".methods.activation.units",
    "PaGELU": ".methods.activation.units",
    "PaGLU": ".methods.activation.units",
    "PaGTU": ".methods.activation.units",
    "PaMishU": ".methods.activation.units",
    "PaReGLU": ".methods.activation.units",
    "PaSwishU": ".methods.activation.units",
    "PaUnit": ".methods.activation.units",
    "BorderBiasConv2d": ".surgery.merge",
    "MergeReport": ".surgery.merge",
    "MergeRequest": ".surgery.merge",
    "merge_layers": ".surgery.merge",
    "ModuleChange": ".surgery.shrink",
    "ShrinkResult": ".surgery.shrink",
    "mask_model": ".surgery.shrink",
    "shrink_model": ".surgery.shrink",
    "count_macs": ".surgery.macs",
    "FermiReport": ".report",
    "SparsityReport": ".report",
    "compute_sparsity": ".report",
    "count_parameters": ".report",
    "PerplexityResult": ".metrics",
    "perplexity": ".metrics",
    "RemovedBlocks": ".surgery.depth",
    "block_importance": ".surgery.depth",
    "remove_blocks": ".surgery.depth",
}


_SUBPACKAGES = ("converters", "recipes", "core", "methods", "surgery", "calibration", "io", "allocation")


def __getattr__(name: str) -> Any:
    from importlib import import_module

    if name in _SUBPACKAGES:  # ``fermigates.converters.hf_layers...`` after a bare ``import fermigates``
        return import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fermigates' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
    "gates_open",
    "freeze_decisions",
    "fine_tune",
    "TrainLog",
    "fermi_trainer_callback",
    "hard_gates",
    "list_recipes",
    "load_recipe",
    "Recipe",
    "RecipeError",
    "write_report",
    "prune",
    "Budget",
    "BudgetResult",
    "refine_gates",
    "RefineResult",
    "sparsity_at",
    "summary",
    "temperature_at",
    "DEEPR",
    "Method",
    "RewireConfig",
    "RewiredConv1d",
    "RewiredConv2d",
    "RewiredConv3d",
    "RewiredLinear",
    "SoftDEEPR",
    "get_method",
    "make_optimizer",
    "register_method",
    "rewire_param_groups",
    "ActivationAnnealer",
    "ActivationOptions",
    "PaActivation",
    "PaGELU",
    "PaGLU",
    "PaGTU",
    "PaMishU",
    "PaReGLU",
    "PaSwishU",
    "PaUnit",
    "set_alpha",
    "BorderBiasConv2d",
    "MergeReport",
    "MergeRequest",
    "merge_layers",
    "PerplexityResult",
    "perplexity",
    "RemovedBlocks",
    "block_importance",
    "remove_blocks",
    "SpectralLinear",
    "SpectralOptimizer",
    "SpectralOptions",
    "SpectralResult",
    "spectral_distill",
    "spectral_parameters",
    "spectral_pretrain",
    "spectral_prune",
    "spectral_trainable",
]
