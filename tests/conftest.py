"""Shared test settings: deterministic, small thread count (CI has 2 cores)."""

import logging

import pytest
import torch

torch.set_num_threads(2)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
