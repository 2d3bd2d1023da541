"""Assembly of components and models into new classifiers (alignment padding, scaling)."""

from .adapters import InputAdapter, contract_shape, convert_images
from .core import (
    DUPLICATES,
    LAYOUTS,
    SCALINGS,
    AssembledModel,
    AssemblyConfig,
    assemble_models,
    evaluate_assembly,
    label_map,
    union_test_set,
)
from .layouts import LAYOUT_REGISTRY, Layout, get_layout
from .parts import Part
from .scalings import SCALING_REGISTRY, Scaling, default_scaling, get_scaling

__all__ = ["DUPLICATES", "LAYOUTS", "LAYOUT_REGISTRY", "SCALINGS", "SCALING_REGISTRY",
           "AssembledModel", "AssemblyConfig", "InputAdapter", "Layout", "Part", "Scaling",
           "assemble_models",
           "contract_shape", "convert_images", "default_scaling", "evaluate_assembly",
           "get_layout", "get_scaling", "label_map", "union_test_set"]
