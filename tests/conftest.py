"""Tiny models built from configs (no Hub), shared by the test battery."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tests.helpers.tiny_models import MODEL_KINDS, VOCAB


@pytest.fixture(params=MODEL_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; more only contend with the other processes on a shared CPU. Modules
    that train in-process use it for every test: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
