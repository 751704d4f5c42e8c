"""Class-conditional samples of one EGC checkpoint under different guidance settings, in one process.

    python -m benchmarks.egc_guidance_sweep --checkpoint runs/egc-fmnist --per-class 50 --configs 1,1 1,6 3,0 3,1

Protocol. The run is loaded with ``jemlab.run.load_run`` (EMA weights). Each configuration ``w,s`` sets the
classifier-free weight ``egc.label_guidance = w`` (label-conditioned runs; 1 = the conditional energy alone) and the
classifier-guidance scale ``egc.guidance = s`` (the model's own classifier), then draws ``--per-class`` samples of
every class with ``jemlab.generate.generate`` (the run's sampler, DDIM-50 for the ``egc`` preset) from the same seed.
Reported per configuration:

- ``agreement``: how often the evaluation's cached reference feature net (the one `jemlab eval --parts samples`
  uses) classifies a sample as the class it was drawn for; ``own_agreement``: the same with the model's own t = 0
  classifier;
- ``frechet_conditional``: Fréchet distance in that feature net's space to as many test images (the
  class-conditional FD of the evaluation), and the real-vs-real floor (test against validation images);
- variety within each class: ``near_copies`` (samples with another sample of their class closer than
  RMS 0.05 on the [0, 1] scale, `jemlab.quality.diversity`) and ``nn_rms`` (mean distance to the nearest other
  sample of the class; real Fashion-MNIST classes: ~0.1–0.2);
- ``seconds_per_image`` on ``--threads`` threads, and a grid (one row per class, first 10 of each) next to the JSON.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.egc_feature_space import add_arguments, load
from jemlab.generate import generate
from jemlab.quality import metrics as sq
from jemlab.quality.diversity import within_class_diversity


def parse_config(text: str) -> tuple[float, float]:
    """``w,s`` → (label_guidance w, guidance s)."""
    try:
        w, s = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"bad configuration '{text}': write w,s (classifier-free weight, classifier scale)") from None
    if w < 0 or s < 0:
        raise SystemExit(f"bad configuration '{text}': w and s must be >= 0")
    return w, s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--per-class", type=int, default=50, help="samples per class and configuration")
    parser.add_argument("--configs", nargs="+", default=["1,1", "1,6", "2,0", "3,0", "3,1"])
    args = parser.parse_args()
    configs = {text: parse_config(text) for text in args.configs}
    space = load(args.checkpoint, threads=args.threads)
    run, num_classes = space.run, space.splits.num_classes
    labels = torch.arange(num_classes).repeat_interleave(args.per_class)
    n = len(labels)
    floor = space.set_reference(n, args.seed)
    print(f"real vs real ({n} images): {floor:.2f}")
    base = run.config.egc
    rows = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for text, (w, s) in configs.items():
        run.config.egc = replace(base, label_guidance=w, guidance=s)
        start = time.perf_counter()
        x, _ = generate(run, n, labels=labels, generator=torch.Generator().manual_seed(args.seed))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            agreement = sq.sample_class_accuracy(space.net(x), labels, num_classes)
            own = {"accuracy": None}  # the ε-prediction control has no classifier
            if getattr(run.model, "has_classifier", True):
                own = sq.sample_class_accuracy(run.model.logits(x), labels, num_classes)
        variety = within_class_diversity(x, labels)
        fd = space.frechet(x)
        rows_per_class = torch.cat([x[labels == c][:10] for c in range(num_classes)])
        grid = Path(args.out) / f"egc_guidance_sweep-{stamp}-w{w:g}-s{s:g}.png"
        title = f"{base.parameterisation} w={w:g} s={s:g}"  # energy (EGC) or epsilon (the control)
        sq.plot_image_grid(rows_per_class, grid, nrow=min(10, args.per_class), title=title)
        rows[text] = {
            "label_guidance": w,
            "guidance": s,
            "agreement": agreement["accuracy"],
            "per_class_agreement": agreement["per_class_accuracy"],
            "own_agreement": own["accuracy"],
            "frechet_conditional": fd,
            "near_copies": variety.near_copies,
            "nn_rms": variety.nn_rms,
            "seconds_per_image": seconds / n,
            "grid": str(grid),
        }
        print(
            f"w={w:g} s={s:g}: agreement {agreement['accuracy']:.3f} (own {own['accuracy']}), conditional FD "
            f"{fd:.2f}, near-copies {variety.near_copies}/{n}, nn_rms {variety.nn_rms:.3f}, "
            f"{1e3 * seconds / n:.0f} ms/image",
            flush=True,
        )
    run.config.egc = base
    path = write_result(
        "egc_guidance_sweep",
        {
            "checkpoint": args.checkpoint,
            "per_class": args.per_class,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "sampler": f"{base.sampler}, {base.sample_steps} steps, eta {base.eta}",
            "table": rows,
            **space.summary(),
        },
        args.out,
    )
    print(path)


if __name__ == "__main__":
    main()
