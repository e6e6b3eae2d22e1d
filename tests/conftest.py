import pytest

from metagg.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")
