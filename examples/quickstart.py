"""jemlab from Python in one page: train a tiny model, load it, classify, score OOD, sample.

    python examples/quickstart.py [--out DIR] [--epochs N]

It writes a tiny generated stand-in for Fashion-MNIST (one bright blob per class, 28×28 grey), trains the default
JEM on it for a few seconds, loads the run back and calls every function of the API. With a real dataset, drop the
data lines and the overrides: ``jemlab.train("default", "runs/fm", {"train.minutes": 15})``.
tests/test_api.py runs this file in CI.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import jemlab
from jemlab.data.testing import make_images, write_idx_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the data and the run (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs over 250 images (default: 3)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="jemlab-quickstart-"))
    torch.set_num_threads(1)

    # 1. Train, with a callback that sees every logged metrics record (step, loss, accuracy, ...).
    data = write_idx_dataset(out / "data", n_train=300, n_test=100, seed=0)
    overrides = {
        "data.dataset": "fashion-mnist",
        "data.data_dir": str(data),
        "data.download": False,
        "data.val_size": 50,
        "train.epochs": args.epochs,
        "train.batch_size": 32,
        "train.log_every": 3,
        "train.progress": False,
        "train.tensorboard": False,
        "sampler.steps": 3,
        "sampler.buffer_size": 100,
        "optim.warmup_steps": 3,
    }

    def progress(record: dict) -> None:
        if "loss" in record:
            print(f"  step {record['step']}: loss {record['loss']:.3f}, accuracy {record['train_accuracy']:.2f}")

    print("training ...")
    jemlab.train("default", out / "run", overrides, callback=progress)

    # 2. Load it back (a run directory or a checkpoint file; JEM or EGC).
    model = jemlab.load(out / "run", device="cpu")
    print(model)
    print("classes:", model.class_names[:3], "...; image shape:", model.image_shape, "; preset:", model.config.preset)

    # 3. Classify. uint8 0-255 as (N, H, W) or (N, H, W, C), or float in [0, 1] as (N, C, H, W) or (N, H, W).
    labels = np.arange(8) % 10
    images = make_images(labels, rng=np.random.default_rng(1))[:, 0]  # uint8 (8, 28, 28), as from PIL
    probs = model.predict_proba(images)
    print("p(y|x) of the first image:", [round(p, 2) for p in probs[0].tolist()])
    print("predicted:", model.predict(images).tolist(), "true:", labels.tolist())
    floats = torch.from_numpy(images).float().div(255).unsqueeze(1)  # the same images as float (N, 1, H, W)
    assert torch.equal(model.predict(floats), model.predict(images))
    print("energy E(x):", [round(e, 2) for e in model.energy(images).tolist()])

    # 4. Out-of-distribution scores against the model's scores on real test images (as `jemlab serve`).
    model.fit_reference(size=100)  # optional: ood_score fits 1,000 test images by itself on first use
    noise = torch.rand(4, 28, 28)
    for name, batch in (("test-like images", images), ("uniform noise", noise)):
        scores = model.ood_score(batch)
        print(
            f"{name}: typicality {[round(s, 2) for s in scores.score.tolist()]}, "
            f"out of distribution {scores.out_of_distribution.tolist()}"
        )

    # 5. Samples in [0, 1]: unconditional, of one class, one row per class; reproducible with a seed.
    x = model.sample(8, seed=0)
    per_class = model.sample(20, labels=torch.arange(10).repeat_interleave(2), seed=0)
    sandals = model.draw(4, labels="Sandal", seed=1)
    assert torch.equal(x, model.sample(8, seed=0))
    print(
        f"samples {tuple(x.shape)} in [{float(x.min()):.2f}, {float(x.max()):.2f}], "
        f"per class {tuple(per_class.shape)}, "
        f"sandals classified as sandals: {model.self_agreement(sandals):.0%} ({sandals.protocol['steps']} SGLD steps)"
    )
    print("done:", out)


if __name__ == "__main__":
    main()
