"""modellego: take trained CNN classifiers apart into class-aware components and assemble
components into new classifiers, without training.

>>> import modellego as ml
>>> model, manifest = ml.load_model("checkpoints/fashion-mnist/vgg16_bn.safetensors")
>>> comp, comp_manifest, report = ml.disassemble(model, manifest,
...                                              ml.DisassemblyConfig(classes=(0, 1, 2)))
>>> ml.save_model("tshirt-trouser-pullover.safetensors", comp.model, comp_manifest)
"""

from ._version import __version__
from .analysis.locate import LocateConfig
from .assembly import AssembledModel, AssemblyConfig, assemble, evaluate_assembly
from .compress import CompressConfig, Compressed, compress_model
from .data import list_datasets, load_split, normalize
from .disassemble import Component, DisassemblyConfig, disassemble_model
from .distill import DistillConfig, distill
from .errors import (
    DataError,
    ModelFileError,
    ModelLegoError,
    PlanError,
    TrainingError,
    UnsupportedModelError,
)
from .evaluate import evaluate
from .io import load_model, read_manifest, save_model
from .models import create_model, list_models
from .surgery.plan import ComponentPlan
from .train import TrainConfig, train
from .workflows import compress, disassemble

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
    "LocateConfig",
    "ModelFileError",
    "ModelLegoError",
    "PlanError",
    "TrainConfig",
    "TrainingError",
    "UnsupportedModelError",
    "__version__",
    "assemble",
    "compress",
    "compress_model",
    "create_model",
    "disassemble",
    "disassemble_model",
    "distill",
    "evaluate",
    "evaluate_assembly",
    "list_datasets",
    "list_models",
    "load_model",
    "load_split",
    "normalize",
    "read_manifest",
    "save_model",
    "train",
]
