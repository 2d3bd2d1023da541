"""Assembly of components and models into new classifiers (alignment padding, scaling)."""

from .adapters import InputAdapter, contract_shape, convert_images
from .core import (
    DUPLICATES,
    LAYOUTS,
    AssembledModel,
    AssemblyConfig,
    assemble,
    evaluate_assembly,
    label_map,
    union_test_set,
)
from .scoring import SCALINGS

__all__ = ["DUPLICATES", "LAYOUTS", "SCALINGS", "AssembledModel", "AssemblyConfig",
           "InputAdapter", "assemble", "contract_shape", "convert_images", "evaluate_assembly",
           "label_map", "union_test_set"]
