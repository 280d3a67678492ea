"""Fixtures for the streaming tests (helpers live in helpers.py)."""

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator, fresh for each test."""
    return torch.Generator().manual_seed(1234)
