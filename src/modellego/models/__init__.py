"""The model zoo: every architecture registers itself on import."""

from . import inception, mobilenet, resnet, small, vgg, vit  # noqa: F401  (registration)
from .registry import (
    ModelInfo,
    build_architecture,
    create_model,
    list_models,
    model_info,
    register_model,
)
from .sources import split_source, trusted

__all__ = ["ModelInfo", "build_architecture", "create_model", "list_models", "model_info",
           "register_model", "split_source", "trusted"]
