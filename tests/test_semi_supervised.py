"""Few labels (data.labels_per_class): which images each term of the loss sees, and that runs stay reproducible.

- The labelled subset is class-balanced, seeded, nested across budgets and the same in another process.
- Cross-entropy sees only labelled images (a spy on the loss inputs); the log p(x) batch draws from every training
  image, and from unlabelled images when the dataset has them (also end to end from a user .npz).
- The softmax baseline with labels_per_class trains on the labelled subset only.
- Resume is exact (weights, replay buffer and both batchers); another label budget is refused on resume.
- The labelled stream splits into rank blocks and resumes on another number of processes; two real gloo processes
  train in step.
- Header and metrics.json state the label budget; validation errors are one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from jemlab.config import build_config
from jemlab.data.dataset import ArrayDataset
from jemlab.data.labelled import LabelledBatcher, labelled_subset, subset_digest
from jemlab.errors import CheckpointError, ConfigError, DataError
from jemlab.training import loop
from jemlab.training.loop import Trainer

PER_CLASS = 5  # the tiny dataset has 500 training images, 50 per class: 50 labelled


def _overrides(tiny_config_overrides, preset_extra=()):
    return [
        *tiny_config_overrides,
        ("data.labels_per_class", str(PER_CLASS)),
        ("objective.input_noise", "0"),  # images reach the loss exactly as stored, so they can be identified
        *preset_extra,
    ]


def _rows(x: torch.Tensor, data: ArrayDataset) -> torch.Tensor:
    """For each image of a batch, its index in `data` (every image must occur there exactly once)."""
    all_x, _ = data.batch(slice(None))
    match = (x.flatten(1)[:, None, :] == all_x.flatten(1)[None, :, :]).all(-1)  # (B, N)
    assert (match.sum(1) == 1).all(), "an image of the batch is not one of the dataset's"
    return match.float().argmax(1)


class _LossSpy:
    """Wraps `jem_loss` and records what each call was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, torch.Tensor | None]] = []
        real = loop.jem_loss

        def spy(model, x_data, y_data, x_model, weights, x_model_cond=None, y_model_cond=None, x_data_px=None):
            self.calls.append({"x": x_data.detach().clone(), "y": y_data.clone(), "x_px": x_data_px})
            return real(model, x_data, y_data, x_model, weights, x_model_cond, y_model_cond, x_data_px=x_data_px)

        monkeypatch.setattr(loop, "jem_loss", spy)


def _steps(trainer: Trainer, n: int) -> None:
    for _ in range(n):
        x, y, x_px = trainer.next_batch()
        trainer.train_step(x, y, epoch=0, x_px=x_px)


# --- the labelled subset -----------------------------------------------------------------------------------------


def test_subset_is_class_balanced_seeded_and_nested():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]
    index = labelled_subset(labels, 10, 10, seed=0)
    assert len(index) == 100 and len(set(index.tolist())) == 100
    assert torch.bincount(labels[index], minlength=10).tolist() == [10] * 10
    assert torch.equal(index, labelled_subset(labels, 10, 10, seed=0))
    assert not torch.equal(index, labelled_subset(labels, 10, 10, seed=1))
    # A larger budget holds the smaller one (same seed): 10 labels per class are among the 50.
    assert set(index.tolist()) <= set(labelled_subset(labels, 50, 10, seed=0).tolist())


def test_subset_is_the_same_in_another_process():
    code = (
        "import torch; from jemlab.data.labelled import labelled_subset, subset_digest;"
        "labels = torch.arange(1000) % 10; labels = labels[torch.randperm(1000, generator=torch.Generator()"
        ".manual_seed(3))]; print(subset_digest(labelled_subset(labels, 10, 10, seed=0)))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]
    assert other == subset_digest(labelled_subset(labels, 10, 10, seed=0))


def test_a_class_with_too_few_images_is_a_one_line_error():
    labels = torch.tensor([0] * 20 + [1] * 3)
    with pytest.raises(DataError, match=r"class 1 \(trouser\) has only 3 training images") as err:
        labelled_subset(labels, 4, 2, seed=0, class_names=["shirt", "trouser"])
    assert "\n" not in str(err.value)


# --- the labelled stream -----------------------------------------------------------------------------------------


def _dataset(n: int = 12) -> ArrayDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)  # image i has pixel value i
    return ArrayDataset(images, torch.arange(n) % 3)


def _ids(x: torch.Tensor) -> list[int]:
    return ((x.flatten() + 1) * 127.5).round().long().tolist()


def test_labelled_stream_covers_the_subset_evenly_and_batches_may_exceed_it():
    data, index = _dataset(), torch.tensor([1, 4, 7, 10, 11])
    batcher = LabelledBatcher(data, index, batch_size=8, seed=0)  # a batch is larger than the subset
    seen = []
    for _ in range(5):  # 40 images = 8 whole passes over the 5 labelled ones
        x, y = batcher.next_batch()
        seen += _ids(x)
        assert torch.equal(y, torch.tensor(_ids(x)) % 3)
    assert sorted(set(seen)) == index.tolist()
    assert all(seen.count(i) == 8 for i in index.tolist())
    assert batcher.passes == 8


def test_rank_blocks_make_the_global_batch_and_resume_on_another_world_size():
    data, index = _dataset(), torch.tensor([0, 2, 3, 5, 8, 9, 11])
    single = LabelledBatcher(data, index, batch_size=6, seed=1)
    ranks = [LabelledBatcher(data, index, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        expected = _ids(single.next_batch()[0])
        assert _ids(ranks[0].next_batch()[0]) + _ids(ranks[1].next_batch()[0]) == expected
    # The two-process state (the same on both ranks) continues on one process where the pair left off.
    assert ranks[0].state_dict()["offset"] == ranks[1].state_dict()["offset"]
    resumed = LabelledBatcher(data, index, batch_size=6, seed=1)
    resumed.load_state_dict(ranks[0].state_dict())
    assert _ids(resumed.next_batch()[0]) == _ids(single.next_batch()[0])
    with pytest.raises(CheckpointError, match="another labelled subset"):
        LabelledBatcher(data, index[:-1], batch_size=6, seed=1).load_state_dict(single.state_dict())


# --- what each term of the loss sees -----------------------------------------------------------------------------


def test_cross_entropy_sees_only_labelled_images_and_px_sees_all(tiny_config_overrides, monkeypatch):
    trainer = Trainer(build_config("default", _overrides(tiny_config_overrides)), None)
    train = trainer.splits.train
    labelled = set(trainer.labelled_index.tolist())
    assert len(labelled) == PER_CLASS * 10
    assert torch.bincount(train.labels[trainer.labelled_index], minlength=10).tolist() == [PER_CLASS] * 10
    spy = _LossSpy(monkeypatch)
    _steps(trainer, 8)  # 256 CE images (5 passes over the 50 labelled), 256 p(x) images of 500
    ce_rows, px_rows = set(), set()
    for call in spy.calls:
        rows = _rows(call["x"], train)
        assert set(rows.tolist()) <= labelled, "cross-entropy saw an image outside the labelled subset"
        assert torch.equal(call["y"], train.labels[rows])
        ce_rows |= set(rows.tolist())
        assert call["x_px"] is not None and len(call["x_px"]) == 32
        px_rows |= set(_rows(call["x_px"], train).tolist())
    assert ce_rows == labelled
    assert len(px_rows - labelled) > 150  # the p(x) batches come from all 500 images, mostly unlabelled ones
    # The class Gaussians that start the chains are fitted on the labelled images only.
    from jemlab.samplers.init import fit_class_gaussians

    subset = train.subset(trainer.labelled_index)
    fitted = fit_class_gaussians(subset.images, subset.labels, 10, "diag", 32)
    assert torch.equal(trainer.init.means, fitted.means)


def test_unlabelled_images_join_only_the_px_pool(tiny_config_overrides, monkeypatch):
    from jemlab.data import load_dataset

    config = build_config("default", _overrides(tiny_config_overrides))
    d = config.data
    splits = load_dataset(d.dataset, d.data_dir, val_size=d.val_size, seed=0, download=False)
    # 80 extra images with no label (their pixels inverted, so none equals a training image)
    splits.unlabelled = ArrayDataset(255 - splits.test.images[:80], torch.full((80,), -1, dtype=torch.int64))
    trainer = Trainer(config, None, splits=splits)
    assert len(trainer.batcher.dataset) == 580 and len(trainer.batcher) == 580 // 32
    assert trainer.label_budget() == "labels=5/class (50 labelled of 500 + 80 unlabelled) "
    spy = _LossSpy(monkeypatch)
    _steps(trainer, 6)
    pool = trainer.batcher.dataset
    px_rows = torch.cat([_rows(call["x_px"], pool) for call in spy.calls])
    assert (px_rows >= 500).any()  # some p(x) images are unlabelled ones
    for call in spy.calls:
        assert (_rows(call["x"], pool) < 500).all()


def test_a_user_npz_with_unlabelled_images_trains_end_to_end(tmp_path):
    from jemlab.data.testing import write_npz_dataset

    path = write_npz_dataset(tmp_path / "few.npz", 200, num_classes=4, n_unlabelled=60, n_test=40)
    overrides = [
        ("data.dataset", str(path)),
        ("data.val_size", "20"),
        ("data.labels_per_class", "3"),
        ("train.batch_size", "16"),
        ("train.epochs", "1"),
        ("train.progress", "false"),
        ("train.tensorboard", "false"),
        ("sampler.steps", "2"),
        ("sampler.buffer_size", "50"),
    ]
    trainer = Trainer(build_config("default", overrides), tmp_path / "run")
    result = trainer.fit()
    assert result["step"] == 240 // 16  # an epoch is a pass over the 180 labelled and 60 unlabelled images
    assert result["labels_per_class"] == 3 and result["labelled_images"] == 12
    header = (tmp_path / "run" / "train.log").read_text()
    assert "labels=3/class (12 labelled of 180 + 60 unlabelled)" in header


def test_softmax_baseline_trains_on_the_labelled_subset_only(tiny_config_overrides, monkeypatch, tmp_path):
    trainer = Trainer(build_config("softmax", _overrides(tiny_config_overrides)), tmp_path / "run")
    spy = _LossSpy(monkeypatch)
    result = trainer.fit()
    labelled = set(trainer.labelled_index.tolist())
    assert len(spy.calls) == 2 * (500 // 32)  # as many steps as with all labels: epochs count all images
    for call in spy.calls:
        assert call["x_px"] is None  # no p(x) term: the forward pass holds the labelled batch only
        assert set(_rows(call["x"], trainer.splits.train).tolist()) <= labelled
    # The header and metrics.json state the label budget.
    header = (tmp_path / "run" / "train.log").read_text()
    assert "labels=5/class (50 labelled of 500)" in header
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["labels_per_class"] == PER_CLASS and metrics["labelled_images"] == 50
    assert result["labelled_images"] == 50
    # `jemlab eval` reports the run's label budget.
    from jemlab.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["labels_per_class"] == PER_CLASS


def test_all_labels_keep_one_batch_for_both_terms(tiny_config_overrides):
    trainer = Trainer(build_config("default", tiny_config_overrides), None)
    assert trainer.labelled is None and trainer.label_budget() == ""
    x, _, x_px = trainer.next_batch()
    assert x_px is None and len(x) == 32


# --- resume ------------------------------------------------------------------------------------------------------


def test_resumed_run_repeats_next_steps_exactly(tmp_path, tiny_config_overrides):
    overrides = _overrides(tiny_config_overrides, [("objective.input_noise", "0.03")])
    trainer = Trainer(build_config("default", overrides), tmp_path / "run")
    _steps(trainer, 3)
    trainer.save()
    _steps(trainer, 2)  # the labelled stream crosses into a new pass (50 images, 32 a step)
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    resumed = Trainer(build_config("default", overrides), tmp_path / "run2")
    resumed.resume(tmp_path / "run")
    assert resumed.step == 3
    _steps(resumed, 2)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(resumed.buffer.images, trainer.buffer.images)
    assert resumed.labelled.state_dict()["offset"] == trainer.labelled.state_dict()["offset"]
    assert torch.equal(resumed.labelled.next_batch()[0], trainer.labelled.next_batch()[0])

    # Another label budget (or a checkpoint without a labelled stream) does not fit this run.
    other = [*overrides, ("data.labels_per_class", "6")]
    with pytest.raises(CheckpointError, match="another labelled subset"):
        Trainer(build_config("default", other), None).resume(tmp_path / "run")
    full = Trainer(build_config("default", tiny_config_overrides), tmp_path / "full")
    full.save()
    with pytest.raises(CheckpointError, match="does not fit this run"):
        Trainer(build_config("default", overrides), None).resume(tmp_path / "full")


# --- two processes -----------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, port: int, data_dir: str, out_dir: str) -> None:
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    config = build_config("default", _ddp_overrides(data_dir))
    trainer = Trainer(config, None)
    rows = []
    for _ in range(3):
        x, y, x_px = trainer.next_batch()
        rows.append(_rows(x, trainer.splits.train))
        trainer.train_step(x, y, epoch=0, x_px=x_px)
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save(
        {"index": trainer.labelled_index, "rows": torch.stack(rows), "params": flat},
        Path(out_dir) / f"rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


def _ddp_overrides(data_dir: str) -> list[tuple[str, object]]:
    return [
        ("data.data_dir", data_dir),
        ("data.val_size", "40"),
        ("data.limit", "160"),
        ("data.download", "false"),
        ("data.labels_per_class", "3"),
        ("objective.input_noise", "0"),
        ("model.width", "4"),
        ("model.features", "32"),
        ("train.batch_size", "8"),
        ("train.threads", "1"),
        ("sampler.steps", "2"),
        ("sampler.buffer_size", "40"),
        ("sampler.batch_size", "4"),
        ("sampler.init", "uniform"),
    ]


def test_two_processes_share_the_subset_and_split_each_labelled_batch(tiny_idx_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tiny_idx_dir), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(got[0]["index"], got[1]["index"])  # the same labelled subset on every rank
    assert torch.equal(got[0]["params"], got[1]["params"])  # DDP kept the ranks in step
    # Rank blocks of one stream: together they are the global batches one process would draw.
    single = Trainer(build_config("default", _ddp_overrides(str(tiny_idx_dir))), None)
    train, index = single.splits.train, single.labelled_index
    stream = LabelledBatcher(train, index, batch_size=16, seed=single.labelled.seed)  # 2 ranks × 8
    for step in range(3):
        expected = _rows(stream.next_batch()[0], train)
        assert torch.equal(torch.cat([got[0]["rows"][step], got[1]["rows"][step]]), expected)


# --- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "ten", "true"])
def test_labels_per_class_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError) as err:
        build_config("default", [("data.labels_per_class", value)])
    assert "data.labels_per_class" in str(err.value) and "\n" not in str(err.value)


def test_labels_per_class_config_errors():
    assert build_config("softmax", [("data.labels_per_class", "10")]).data.labels_per_class == 10
    assert build_config("default", [("data.labels_per_class", "none")]).data.labels_per_class is None
    with pytest.raises(ConfigError, match=r"objective\.name=jem"):
        build_config("egc", [("data.labels_per_class", "10")])
    with pytest.raises(ConfigError, match=r"objective\.pxy=0"):
        build_config("default", [("data.labels_per_class", "10"), ("objective.pxy", "1")])
    with pytest.raises(ConfigError, match=r"sampler\.init=uniform"):
        build_config("default", [("data.labels_per_class", "1")])
    with pytest.raises(ConfigError, match=r"unknown config key .*labels_per_class"):  # lists the valid keys
        build_config("default", [("data.labels_per_clas", "10")])
