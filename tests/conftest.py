"""Fixtures shared by every test module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modellego.data import load_split, normalize
from modellego.files import save_model
from modellego.models import create_model
from modellego.training import TrainConfig, train


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Tiny models run faster (and far more steadily on a busy machine) on one thread.

    Autouse for the whole session; module-scoped fixtures that train or build models may also
    request it by name to make the dependency explicit.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised digits train split: images and class ids."""
    split = load_split("digits", "train")
    return normalize(split.images, split.info), split.labels


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    """A simnet trained for 60 SGD steps on the digits train split (well above chance).

    Module-scoped: each test module gets its own copy to disturb."""
    x, y = digits
    torch.manual_seed(0)
    model = create_model("simnet", in_channels=1, num_classes=10, input_size=28, width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def simnet_digits_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simnet (width 0.25) trained for one epoch on digits, saved as a model file.

    Session-scoped and shared: tests read it, never change it."""
    model, manifest = train(TrainConfig(arch="simnet", dataset="digits", epochs=1, width=0.25,
                                        batch_size=32), progress=False)
    path = tmp_path_factory.mktemp("simnet-digits") / "source.safetensors"
    save_model(path, model, manifest)
    return path
