import pytest
import torch

from metagg.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture
def one_thread():
    """One torch thread for the test: for small models it is as fast as two, and on a
    shared, busy machine two OpenMP threads can be 10-50x slower (each parallel region
    waits for a descheduled thread). Use with `pytestmark = pytest.mark.usefixtures`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
