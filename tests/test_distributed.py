"""Data-parallel training (distributed.py) with 2 CPU processes over gloo, one thread each.

1. One DDP step on two ranks gives the gradients and parameters of one process on the concatenated batch (data and
   SGLD negatives fixed, so only the parallelism differs).
2. A 2-process run writes one ordinary checkpoint (whole buffer, every rank's generators) that 2 processes resume
   exactly and 1 process resumes and finishes.
Plus in-process checks of the buffer shard layouts and of the augmentation.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.multiprocessing as mp

from jemlab.config import build_config
from jemlab.data.augment import augment
from jemlab.distributed import DistEnv, init_distributed
from jemlab.samplers import ReplayBuffer
from jemlab.samplers.buffer_shards import gather_buffer, load_buffer_shard
from jemlab.samplers.init import uniform_init
from jemlab.training.checkpoint import load_checkpoint
from jemlab.training.loop import Trainer

WORLD = 2
BATCH = 8  # per rank


def _overrides(data_dir: str) -> list[tuple[str, object]]:
    return [
        ("data.data_dir", data_dir),
        ("data.val_size", "40"),
        ("data.limit", "160"),
        ("data.download", "false"),
        ("model.width", "4"),
        ("model.features", "32"),
        ("train.batch_size", str(BATCH)),
        ("train.threads", "1"),
        ("train.progress", "false"),
        ("train.tensorboard", "false"),
        ("train.log_every", "5"),
        ("train.sample_every", "100"),
        ("sampler.steps", "2"),
        ("sampler.buffer_size", "101"),  # not a multiple of 2: the saved buffer fills the slot no shard holds
        ("sampler.batch_size", "4"),
        ("sampler.init", "uniform"),
        ("optim.warmup_steps", "0"),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(WORLD)}
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)


def _fixed_batch(trainer: Trainer, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s data and p(x) negatives, the same whichever process builds them."""
    x, y = trainer.splits.train.batch(torch.arange(rank * BATCH, (rank + 1) * BATCH))
    x_model = torch.rand((4, *x.shape[1:]), generator=torch.Generator().manual_seed(100 + rank)) * 2 - 1
    return x, y, x_model


def _one_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, x_model: torch.Tensor) -> dict[str, torch.Tensor]:
    stats = {"sgld_grad_norm": 0.0, "sgld_steps": 0, "sgld_chain_steps": 0}
    trainer.negatives = lambda n, labels=None: (x_model, stats)  # SGLD negatives held fixed
    trainer.train_step(x, y, epoch=0)
    out = {f"grad.{k}": p.grad.clone() for k, p in trainer.model.named_parameters()}
    out.update({f"param.{k}": p.detach().clone() for k, p in trainer.model.named_parameters()})
    return out


def _step_worker(rank: int, port: int, data_dir: str, out_dir: str) -> None:
    _join(rank, port)
    config = build_config("default", [*_overrides(data_dir), ("objective.input_noise", "0"), ("optim.name", "sgd")])
    trainer = Trainer(config, None)
    assert trainer.dist.world_size == WORLD and trainer.dist.rank == rank
    torch.save(_one_step(trainer, *_fixed_batch(trainer, rank)), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_step_equals_one_process_on_the_concatenated_batch(tiny_idx_dir, tmp_path):
    mp.start_processes(
        _step_worker, args=(_free_port(), str(tiny_idx_dir), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    config = build_config(
        "default", [*_overrides(str(tiny_idx_dir)), ("objective.input_noise", "0"), ("optim.name", "sgd")]
    )
    single = Trainer(config, None)
    assert not single.dist.active
    parts = [_fixed_batch(single, r) for r in range(WORLD)]
    expected = _one_step(single, *(torch.cat(p) for p in zip(*parts, strict=True)))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {key}")


def _fit_worker(rank: int, port: int, data_dir: str, run_dir: str) -> None:
    _join(rank, port)
    # Sample quality measured every 5 iterations: rank 0 measures, and the best-samples checkpoint is a collective.
    config = build_config("default", [*_overrides(data_dir), ("train.epochs", "1"), ("quality.every", "5")])
    trainer = Trainer(config, run_dir)
    trainer.fit()
    # Every rank holds the same weights after training (DDP kept them in step).
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = trainer.dist.all_gather(flat.unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1])
    # Resumed on 2 processes, each rank gets back exactly its own buffer shard and random generators.
    resumed = Trainer(build_config("default", [*_overrides(data_dir), ("train.epochs", "2")]), run_dir)
    resumed.resume(run_dir)
    assert resumed.step == trainer.step
    assert torch.equal(resumed.buffer.images, trainer.buffer.images)
    assert torch.equal(resumed.cpu_generator.get_state(), trainer.cpu_generator.get_state())
    assert torch.equal(resumed.noise_generator.get_state(), trainer.noise_generator.get_state())
    torch.distributed.destroy_process_group()


def test_two_process_checkpoint_resumes_on_two_and_on_one(tiny_idx_dir, tmp_path, monkeypatch):
    from jemlab.data import load_dataset
    from jemlab.quality.reference import reference_feature_net

    # A feature net in a cache of this test's own (the processes inherit the variable), so that rank 0 can track.
    monkeypatch.setenv("JEMLAB_DATA", str(tmp_path / "cache"))
    splits = load_dataset("fashion-mnist", str(tiny_idx_dir), val_size=40, seed=0, download=False, limit=160)
    reference_feature_net(splits, epochs=1)
    run = tmp_path / "run"
    mp.start_processes(
        _fit_worker, args=(_free_port(), str(tiny_idx_dir), str(run)), nprocs=WORLD, start_method="spawn"
    )
    state, meta = load_checkpoint(run)
    assert meta["world_size"] == WORLD
    steps_per_epoch = 160 // (BATCH * WORLD)
    assert meta["progress"]["step"] == steps_per_epoch
    assert state["buffer"]["images"].shape[0] == 101  # the whole buffer, in the one-process layout
    assert (run / "metrics.jsonl").is_file() and (run / "metrics.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = [r["step"] for r in records if "quality_fd" in r]
    assert measured[:2] == [5, 10] and (run / "checkpoints" / "best-samples.safetensors").is_file()

    # One process picks it up: the whole buffer, same epoch, steps counted in its own (half as large) global batches.
    config = build_config("default", [*_overrides(str(tiny_idx_dir)), ("train.epochs", "2")])
    probe = Trainer(config, run)
    probe.resume(run)
    assert not probe.dist.active
    assert torch.equal(probe.buffer.images, state["buffer"]["images"])
    assert probe.step == 160 // BATCH and probe.batcher.epoch == 1
    final = Trainer(config, run).fit(resume_from=run)
    assert final["stop_reason"] == "epochs" and final["step"] == 2 * 160 // BATCH
    assert 0.0 <= final["test_accuracy"] <= 1.0


# --- in-process checks ---------------------------------------------------------------------------------------------


class _FakeEnv(DistEnv):
    """A rank of a pretend job whose all_gather returns tensors prepared by the test."""

    gathered: ClassVar[list[torch.Tensor]] = []

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in type(self).gathered]


@pytest.mark.parametrize("class_conditional", [False, True])
def test_buffer_shards_round_trip_and_reshard(class_conditional):
    init, shape, classes = uniform_init((1, 2, 2)), (1, 2, 2), 2
    kwargs = {"num_classes": classes, "class_conditional": class_conditional}
    gen = torch.Generator().manual_seed(0)
    shards = [ReplayBuffer(10, shape, init, generator=gen, **kwargs) for _ in range(2)]  # buffer_size 21 over 2
    _FakeEnv.gathered = [s.images for s in shards]
    envs = [_FakeEnv(rank=r, world_size=2) for r in range(2)]
    saved = gather_buffer(shards[0], envs[0], 21, gen)
    per_class = 21 // classes if class_conditional else 21
    assert saved["images"].shape[0] == (per_class * classes if class_conditional else 21)
    for rank, env in enumerate(envs):  # the same 2 ranks get their shards back exactly
        fresh = ReplayBuffer(10, shape, init, generator=gen, **kwargs)
        load_buffer_shard(fresh, saved, env)
        assert torch.equal(fresh.images, shards[rank].images)
    # One process reads the saved buffer as its own; three processes each take a third of it.
    whole = ReplayBuffer(21, shape, init, **kwargs)
    load_buffer_shard(whole, saved, DistEnv())
    assert torch.equal(whole.images, saved["images"])
    for rank in range(3):
        third = ReplayBuffer(7, shape, init, **kwargs)
        load_buffer_shard(third, saved, DistEnv(rank=rank, world_size=3))
        assert third.images.shape == (third.capacity, *shape)


def test_single_process_env_and_seeds(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.active, env.is_main) == (0, 1, False, True)
    assert env.seed(7) == 7 and DistEnv(rank=1, world_size=4).seed(7) == 29
    assert env.mean({"a": 1.5, "b": torch.tensor(2.0)}) == {"a": 1.5, "b": 2.0}
    assert env.any(True, False) == (True, False)


def test_augment_crop_flip_shapes_and_content():
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    assert augment(x, "none", gen) is x
    out = augment(x, "crop_flip", gen)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    # A crop at offset 4 (the centre) without flip is the identity; every output is some shifted window.
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(2):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_presets_and_sada_branch_with_bf16_loss(tiny_idx_dir):
    """jem-cifar10 (alias jem) states the paper's augmentation; a step with an unaugmented p(x) branch and a bf16 loss
    runs and reports the throughput keys."""
    assert build_config("jem").to_dict() == {**build_config("jem-cifar10").to_dict(), "preset": "jem"}
    assert build_config("jem-cifar10").data.augment == "crop_flip"
    assert build_config("jem-svhn").data.augment == "crop"
    extra = [("data.augment", "crop_flip"), ("data.augment_px", "none"), ("train.precision", "bf16")]
    trainer = Trainer(build_config("default", [*_overrides(str(tiny_idx_dir)), *extra]), None)
    x, y = trainer.batcher.next_batch()
    stats = trainer.train_step(x, y, epoch=0)
    assert {"loss", "energy_data", "energy_model", "sgld_steps", "sgld_chain_steps"} <= set(stats)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_jem_loss_scores_the_px_images_for_the_px_terms():
    from jemlab.models import build_model
    from jemlab.objectives import JEMWeights, jem_loss

    model = build_model("mlp", (1, 4, 4), 3)
    gen = torch.Generator().manual_seed(0)
    x, x_px, x_model = (torch.rand((5, 1, 4, 4), generator=gen) for _ in range(3))
    y = torch.tensor([0, 1, 2, 0, 1])
    _, stats = jem_loss(model, x, y, x_model, JEMWeights(), x_data_px=x_px)
    torch.testing.assert_close(stats["energy_data"], model.energy(x_px).mean().detach())
    _, plain = jem_loss(model, x, y, x_model, JEMWeights())
    torch.testing.assert_close(stats["ce"], plain["ce"])
