"""The model zoo: every architecture registers itself on import."""

from . import inception, mobilenet, resnet, small, vgg  # noqa: F401  (registration)
from .registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
