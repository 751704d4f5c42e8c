"""Shared fixtures. Tests run on the CPU with one thread: deterministic and friendly to a 2-core machine."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_hardware_findings():
    """Each test sees the probe as its own JEMLAB_PROBE sets it, and no fallback left over from another test."""
    from jemlab.accel import reset_probes
    from jemlab.accel.choices import reset_fallbacks

    yield
    reset_probes()
    reset_fallbacks()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """jemlab's user cache (datasets, the reference feature nets of sample-quality tracking) is a folder of this test
    session, never ~/.cache/jemlab: a feature net trained on a test's tiny data must not reach a real evaluation.
    Session-scoped, so that it is in place before the module-scoped fixtures that train runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JEMLAB_DATA", str(tmp_path_factory.mktemp("jemlab-cache")))
        yield


@pytest.fixture()
def tiny_idx_dir(tmp_path):
    """A small class-structured fake Fashion-MNIST in IDX format (600 train, 100 test images)."""
    from jemlab.data.testing import write_idx_dataset

    folder = tmp_path / "data"
    write_idx_dataset(folder, n_train=600, n_test=100, seed=0)
    return folder


@pytest.fixture()
def tiny_config_overrides(tiny_idx_dir):
    """Overrides that make any preset train in seconds on the tiny dataset."""
    return [
        ("data.data_dir", str(tiny_idx_dir)),
        ("data.val_size", "100"),
        ("data.download", "false"),
        ("train.batch_size", "32"),
        ("train.epochs", "2"),
        ("train.log_every", "5"),
        ("train.progress", "false"),
        ("train.tensorboard", "false"),
        ("sampler.steps", "3"),
        ("sampler.buffer_size", "200"),
        ("optim.warmup_steps", "5"),
        ("quality.every", "0"),  # sample-quality tracking has its own tests (test_quality_tracking.py)
    ]


@pytest.fixture()
def resume_repeats_steps():
    """Check that a resumed EGC trainer repeats two steps exactly: save `trainer`, step it twice, resume a fresh
    trainer (from `make_trainer()`) from the save, step it twice, compare live and EMA weights. Returns the EMA."""

    def check(trainer, make_trainer):
        path = trainer.save()
        for _ in range(2):
            trainer.train_step(*trainer.batcher.next_batch(), epoch=0)
        expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        expected_ema = {k: v.clone() for k, v in trainer.eval_model.state_dict().items()}
        resumed = make_trainer()
        resumed.resume(path)
        for _ in range(2):
            resumed.train_step(*resumed.batcher.next_batch(), epoch=0)
        for key, value in resumed.model.state_dict().items():
            assert torch.equal(value, expected[key]), key
        for key, value in resumed.eval_model.state_dict().items():
            assert torch.equal(value, expected_ema[key]), key
        return expected_ema

    return check
