"""Datasets for modellego: loading, splitting and normalising image classification data.

Registered datasets (:func:`list_datasets`): ``fashion-mnist``, ``mnist``, ``digits``,
``cifar10``, ``cifar100``. The pattern ``folder:PATH`` loads your own images from PATH,
one sub-folder per class (optionally ``PATH/train`` and ``PATH/test``).

Images are returned as float32 ``(N, C, H, W)`` in [0, 1]; apply :func:`normalize` with the
dataset's :class:`DatasetInfo` before feeding a model trained on normalised inputs.
"""

from modellego.data.base import (
    SPLITS,
    DatasetInfo,
    Split,
    convert_images,
    model_input,
    normalize,
)
from modellego.data.builtin import DEFAULT_FASHION_MNIST_DIR
from modellego.data.lazy import (
    Inputs,
    LazyImages,
    ModelInputs,
    as_tensor,
    iter_batches,
    iter_slices,
    reading,
)
from modellego.data.registry import (
    DataDir,
    DataFingerprintWarning,
    canonical_name,
    clear_cache,
    dataset_fingerprint,
    dataset_info,
    dataset_info_for,
    describe_datasets,
    is_folder,
    list_datasets,
    load_split,
    load_split_for,
    register,
)
from modellego.data.roots import DataRoots, roots_from

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "DataDir",
    "DataFingerprintWarning",
    "DataRoots",
    "SPLITS",
    "DatasetInfo",
    "Split",
    "canonical_name",
    "clear_cache",
    "dataset_fingerprint",
    "dataset_info",
    "dataset_info_for",
    "is_folder",
    "Inputs",
    "LazyImages",
    "ModelInputs",
    "as_tensor",
    "iter_batches",
    "iter_slices",
    "reading",
    "describe_datasets",
    "list_datasets",
    "load_split",
    "load_split_for",
    "normalize",
    "model_input",
    "convert_images",
    "register",
    "roots_from",
]
