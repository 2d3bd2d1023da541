"""Fingerprints of a dataset's splits, so that a model file can tell whether the data it is
given is the data it was made on.

A split's fingerprint is its number of images, its count of images per class, and a
SHA-256 over its labels (int64, in order) and a fixed sample of its images (at most
:data:`SAMPLE` images at evenly spaced positions, their float32 pixels in [0, 1]): cheap to
recompute from a loaded split, and different for another dataset in the same file format
(MNIST files where Fashion-MNIST was expected), for changed labels, for a changed or reordered
sample of images, or for a split with images added or removed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

from .base import Split

#: how many images of a split the hash reads
SAMPLE = 64


def split_fingerprint(split: Split) -> dict[str, Any]:
    """``{"n", "class_counts", "sha256"}`` of one loaded split."""
    n = len(split)
    counts = torch.bincount(split.labels, minlength=split.info.num_classes)
    h = hashlib.sha256()
    h.update(split.labels.to(torch.int64).contiguous().numpy().tobytes())
    if n:
        idx = torch.linspace(0, n - 1, min(n, SAMPLE)).round().long().unique()
        h.update(split.images.index_select(0, idx).to(torch.float32).contiguous()
                 .numpy().tobytes())
    return {"n": n, "class_counts": [int(c) for c in counts], "sha256": h.hexdigest()}


def differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """What differs between two split fingerprints, in a few words ("" when they agree)."""
    if expected["n"] != found["n"]:
        return f"{found['n']} images where the model's data had {expected['n']}"
    if list(expected["class_counts"]) != list(found["class_counts"]):
        return "other counts of images per class"
    if expected["sha256"] != found["sha256"]:
        return "other labels or images (SHA-256 of the labels and a sample of images differs)"
    return ""
