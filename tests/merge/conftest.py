"""Merge tests run tiny tensors: one intra-op thread avoids thread contention on busy shared cores
(measured 15x slower with 2 threads when the machine is loaded); restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
