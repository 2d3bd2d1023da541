"""modellego: take trained CNN classifiers apart into class-aware components and assemble
components into new classifiers, without training.

>>> import modellego as ml
>>> model, manifest = ml.load_model("checkpoints/digits/mobilenet_v2.safetensors")
>>> comp, comp_manifest, report = ml.disassemble(model, manifest,
...                                              ml.DisassemblyConfig(classes=(0, 1, 2)))
>>> ml.save_model("zero-one-two.safetensors", comp.model, comp_manifest)
>>> report.classes, report.flops_ratio < 1, comp_manifest.classes
([0, 1, 2], True, (0, 1, 2))
"""

from ._version import __version__
from .analysis.locate import LocateConfig
from .assembly import AssembledModel, AssemblyConfig, Part, assemble_models, evaluate_assembly
from .compression import CompressConfig, Compressed, compress_model
from .data import list_datasets, load_split, normalize
from .disassembly import Component, DisassemblyConfig, disassemble_model
from .distillation import DistillConfig, distill
from .errors import (
    DataError,
    ExportError,
    ModelFileError,
    ModelLegoError,
    PlanError,
    TrainingError,
    UnsupportedModelError,
)
from .evaluation import evaluate
from .exporting import ExportReport, export, export_model
from .files import LoadedModel, load_model, open_model, save_model
from .io import read_manifest
from .manifest import Manifest, as_manifest
from .models import create_model, list_models, trusted
from .surgery.plan import ComponentPlan
from .training import TrainConfig, train
from .workflows import assemble, compress, disassemble
from .workflows.importing import ImportConfig, import_model


def _assemble_package() -> None:
    """Register the kinds of model file with their builders, and hand the registries to the
    layers below that read names from files (so that no module imports the layers above)."""
    from . import manifest
    from .assembly import LAYOUT_REGISTRY, SCALING_REGISTRY
    from .assembly.core import build_assembly
    from .kinds import register_kind
    from .models.registry import build_model
    from .surgery.extract import build_component

    register_kind("model", build_model)
    register_kind("component", build_component)
    register_kind("assembly", build_assembly)
    manifest.set_vocabulary("layout", LAYOUT_REGISTRY.names)
    manifest.set_vocabulary("scaling", SCALING_REGISTRY.names)


_assemble_package()

__all__ = [
    "AssembledModel",
    "AssemblyConfig",
    "Component",
    "ComponentPlan",
    "CompressConfig",
    "Compressed",
    "DataError",
    "DisassemblyConfig",
    "DistillConfig",
    "ExportError",
    "ExportReport",
    "ImportConfig",
    "LoadedModel",
    "LocateConfig",
    "Manifest",
    "ModelFileError",
    "ModelLegoError",
    "PlanError",
    "TrainConfig",
    "TrainingError",
    "UnsupportedModelError",
    "__version__",
    "Part",
    "assemble",
    "assemble_models",
    "as_manifest",
    "compress",
    "compress_model",
    "create_model",
    "disassemble",
    "disassemble_model",
    "distill",
    "evaluate",
    "export",
    "export_model",
    "evaluate_assembly",
    "import_model",
    "list_datasets",
    "list_models",
    "load_model",
    "load_split",
    "normalize",
    "open_model",
    "read_manifest",
    "save_model",
    "train",
    "trusted",
]
