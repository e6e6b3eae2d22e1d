from typing import NamedTuple

import pytest
import torch

from metagg.checkpoint import (
    CheckpointError,
    flatten_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)


class Inner(NamedTuple):
    count: torch.Tensor
    mu: torch.Tensor


def test_state_round_trip():
    state = (Inner(torch.tensor(3), torch.randn(4)), (), {"h": [torch.ones(2, 3)]})
    flat = flatten_state(state)
    assert set(flat) == {"state.0.count", "state.0.mu", "state.2.h.0"}
    template = (Inner(torch.tensor(0), torch.zeros(4)), (), {"h": [torch.zeros(2, 3)]})
    back = unflatten_state(template, flat)
    assert isinstance(back[0], Inner)
    assert torch.equal(back[0].mu, state[0].mu) and int(back[0].count) == 3
    assert torch.equal(back[2]["h"][0], state[2]["h"][0])


def test_unflatten_checks_shapes():
    with pytest.raises(CheckpointError, match=r"state.mu: checkpoint has \(3,\)"):
        unflatten_state(Inner(torch.tensor(0), torch.zeros(4)),
                        {"state.count": torch.tensor(0), "state.mu": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"lacks state tensor state\.mu"):
        unflatten_state(Inner(torch.tensor(0), torch.zeros(4)), {"state.count": torch.tensor(0)})


def test_save_load_and_corruption(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"params": torch.arange(5.0)}, {"round": 7})
    tensors, meta = load_checkpoint(path)
    assert torch.equal(tensors["params"], torch.arange(5.0)) and meta["round"] == 7
    assert "metagg_version" in meta
    assert not list(tmp_path.glob("*.tmp"))
    blob = bytearray((tmp_path / "ckpt.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "ckpt.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (tmp_path / "ckpt.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "other")


def test_tensor_file_metadata_is_trusted_only_when_its_own_hash_holds(tmp_path):
    """After a kill between the two renames the tensor file's own metadata is used, but
    an edit to that metadata (its header is not covered by the old JSON's hash) is
    refused, not loaded."""
    path = tmp_path / "checkpoint"
    save_checkpoint(path, {"params": torch.zeros(3)}, {"round": 10})
    old_json = path.with_suffix(".json").read_text()
    save_checkpoint(path, {"params": torch.ones(3)}, {"round": 20})
    path.with_suffix(".json").write_text(old_json)  # the JSON rename never happened
    assert load_checkpoint(path)[1]["round"] == 20
    tfile = path.with_suffix(".safetensors")
    tfile.write_bytes(tfile.read_bytes().replace(b'\\"round\\": 20', b'\\"round\\": 70'))
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        load_checkpoint(path)
