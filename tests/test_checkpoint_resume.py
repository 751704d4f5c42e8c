"""Checkpoints round-trip, refuse pickles, and a resumed run repeats the next step exactly."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from jemlab.config import build_config
from jemlab.errors import CheckpointError
from jemlab.training.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, save_run_checkpoint
from jemlab.training.loop import Trainer


def test_nested_state_round_trip(tmp_path):
    state = {"a": torch.arange(3), "opt": {"state": {0: {"step": torch.tensor(2.0)}}, "groups": [{"lr": 0.1}]}}
    path = save_checkpoint(tmp_path / "c.safetensors", state, {"hello": [1, 2]})
    loaded, meta = load_checkpoint(path)
    assert torch.equal(loaded["a"], state["a"])
    assert 0 in loaded["opt"]["state"]  # integer keys survive (the optimizer needs them)
    assert loaded["opt"]["groups"][0]["lr"] == 0.1 and meta == {"hello": [1, 2]}


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom(), protocol=2))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    torch.save({"x": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    # a header of 640 (896, ...) bytes is stored as 80 02 00 ..., which is also how a protocol-2 (3, ...) pickle starts
    for pad in range(1000):
        path = save_checkpoint(tmp_path / "c.safetensors", {"a": torch.ones(2)}, {"pad": "x" * pad})
        head = path.read_bytes()[:2]
        if head[0] == 0x80 and head[1] in (2, 3, 4, 5):
            break
    else:
        pytest.fail("no padding gave a header of 640, 896, 1152 or 1408 bytes")
    state, meta = load_checkpoint(path)
    assert torch.equal(state["a"], torch.ones(2)) and meta["pad"] == "x" * pad


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"a": torch.ones(100)}, {})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a jemlab checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing")


def test_a_flipped_bit_in_the_weights_is_caught_by_the_digest(tmp_path):
    weights = torch.linspace(-1, 1, 1000)
    path = save_checkpoint(tmp_path / "c.safetensors", {"w": weights, "b": torch.zeros(3)}, {})
    data = bytearray(path.read_bytes())
    data[-1000] ^= 0x01  # inside w's bytes (safetensors keeps the header first, tensor bytes after it)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match their SHA-256 digest"):
        load_checkpoint(damaged)
    state, _ = load_checkpoint(path)  # the intact file still loads
    assert torch.equal(state["w"], weights)


def test_checkpoints_without_a_digest_still_load(tmp_path):
    from safetensors.torch import save

    from jemlab.training.checkpoint import FORMAT_NAME, FORMAT_VERSION, flatten_state

    tensors: dict[str, torch.Tensor] = {}
    tree = flatten_state({"w": torch.ones(4)}, "s", tensors)
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "state": json.dumps(tree), "meta": "{}"}
    (tmp_path / "old.safetensors").write_bytes(save(tensors, metadata=header))  # as written before the digest
    state, meta = load_checkpoint(tmp_path / "old.safetensors")
    assert torch.equal(state["w"], torch.ones(4)) and meta == {}


def test_run_checkpoints_keep_last_n_and_latest_pointer(tmp_path):
    for step in range(5):
        save_run_checkpoint(tmp_path, step, {"a": torch.tensor(step)}, {}, keep=2)
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.safetensors"))
    assert files == ["step-0000003.safetensors", "step-0000004.safetensors"]
    assert resolve_checkpoint(tmp_path).name == "step-0000004.safetensors"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("preset", ["default", "course"])
def test_resumed_run_repeats_next_step_exactly(tmp_path, tiny_config_overrides, preset):
    config = build_config(preset, tiny_config_overrides)
    trainer = Trainer(config, tmp_path / "run")
    for _ in range(3):
        trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
    trainer.save()
    # The uninterrupted run takes two more steps.
    for _ in range(2):
        trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    expected_buffer = trainer.buffer.images.clone()

    resumed = Trainer(build_config(preset, tiny_config_overrides), tmp_path / "run2")
    resumed.resume(tmp_path / "run")
    assert resumed.step == 3
    for _ in range(2):
        resumed.train_step(*resumed.batcher.next_batch(), epoch=0)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(resumed.buffer.images, expected_buffer)
