import os

import pytest
import torch

from metagg.data import load_dataset

# Tests run the eager workers unless they ask for compiling: a compile costs seconds per
# model shape, and the eager path is the reference (tests/test_compiled_round.py compares).
os.environ.setdefault("METAGG_COMPILE", "0")


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


@pytest.fixture
def rewrite_meta():
    """Rewrite a checkpoint's metadata the way another metagg version would have written
    it (both copies, sidecar and tensor file): `rewrite_meta(stem, edit)`; `edit` changes
    the metadata dict in place. Editing only the sidecar is refused as tampering."""
    from metagg.checkpoint import load_checkpoint, save_checkpoint

    def rewrite(stem, edit) -> None:
        tensors, meta = load_checkpoint(stem)
        meta.pop("sha256", None)
        edit(meta)
        save_checkpoint(stem, tensors, meta)

    return rewrite
