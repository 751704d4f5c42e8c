"""A tiny trained run and a server in a thread, shared by the demo-server tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jemlab.config import build_config
from jemlab.data.testing import write_idx_dataset
from jemlab.serve.app import DemoApp
from jemlab.serve.server import DemoServer, make_server
from jemlab.training.loop import Trainer


def tiny_run(root: Path, preset: str = "default", extra: list[tuple[str, object]] | None = None) -> Path:
    """Train `preset` for one short epoch on a fake 28×28 dataset (plus `extra` overrides); return the run
    directory."""
    data = write_idx_dataset(root / "data", n_train=300, n_test=100, seed=0)
    overrides = [
        ("data.data_dir", str(data)),
        ("data.val_size", "50"),
        ("data.download", "false"),
        ("train.batch_size", "32"),
        ("train.epochs", "1"),
        ("train.log_every", "5"),
        ("train.progress", "false"),
        ("train.tensorboard", "false"),
        ("sampler.steps", "3"),
        ("sampler.buffer_size", "100"),
        ("optim.warmup_steps", "5"),
        ("quality.every", "0"),
    ]
    run_dir = root / "run"
    Trainer(build_config(preset, [*overrides, *(extra or [])]), run_dir).fit()
    return run_dir


@contextmanager
def serving(app: DemoApp) -> Iterator[DemoServer]:
    """Run the app on 127.0.0.1 on a free port in a background thread."""
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
