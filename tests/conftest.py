"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest
import torch


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
