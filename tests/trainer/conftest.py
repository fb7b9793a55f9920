"""Fixtures of the in-process trainer tests: the tiny tokenizer and the synthetic task's training rows."""

from __future__ import annotations

import pytest

from sparse_opd.tasks import arithmetic_dataset
from tests.helpers.tiny_opd import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def train_set():
    return arithmetic_dataset("train", 32, 1)
