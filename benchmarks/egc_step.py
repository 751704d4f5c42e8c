"""Time of one EGC training step (loss, double back-propagation, backward) by precision and CE trunk share.

    python -m benchmarks.egc_step --preset egc --threads 2
    python -m benchmarks.egc_step --preset egc --variants fp32:0.1,bf16:0.1 --rounds 7

Protocol. The preset's network is built once on the CPU (its initial weights), with a batch of the run's batch size
from the dataset's training split and one generator for the draws. A *variant* is ``precision:trunk_grad[:cl]``: the
autocast dtype of the forward passes (``fp32`` or ``bf16``, as ``egc.precision`` resolves them),
``egc.ce_trunk_grad``, and with ``:cl`` a copy of the network and the batch in NHWC layout (channels last);
every other loss weight is the preset's. A *round* times each variant once, in a fixed
order, as the mean of ``--repeats`` steps (`jemlab.objectives.egc_loss` then ``loss.backward()``; no optimiser
update, which is the same for every variant) with ``time.perf_counter``; the first round is discarded. Per variant
we report the median and min over rounds in milliseconds and the speed-up of medians against the first variant.

Fidelity. For each variant after the first, the parameter gradient of one step is compared with the first
variant's on the same draws: the cosine and the norm ratio (1 and 1 for an identical gradient). With a different
``trunk_grad`` the gradients differ by design; the cosine is then a measure of how much.

bf16 is only timed where it is native (``egc.precision=bf16`` would otherwise run emulated, several times slower);
elsewhere its variants are skipped with the reason. The result (JSON, via benchmarks.common.write_result) records
the machine, torch version, git sha and settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from benchmarks.common import write_result
from jemlab.accel import AUTOCAST_DTYPES, probe
from jemlab.config import build_config, parse_overrides
from jemlab.data.registry import load_dataset
from jemlab.models import build_model
from jemlab.objectives import EGCWeights, egc_loss
from jemlab.training.egc import EGCTraining


def _gradient(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="egc")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", default="fp32:0.1,bf16:0.1,fp32:0,bf16:0", help="precision:trunk_grad,...")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="steps per timing")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = build_config(args.preset, [("data.dataset", args.dataset), *parse_overrides(args.overrides)])
    splits = load_dataset(config.data.dataset, config.data.data_dir)
    x, y = splits.train.batch(slice(0, config.train.batch_size))
    model = build_model(config.model.name, tuple(x.shape[1:]), splits.num_classes, options=config.model.options)
    model.train()
    training = EGCTraining(config, model)  # the Trainer's schedule and loss weights for this config
    schedule, base = training.schedule, training.weights

    native = probe("cpu")["bf16_native"]
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layouts = {False: (model, x), True: (nhwc, x.contiguous(memory_format=torch.channels_last))}
    variants, skipped = {}, {}
    for spec in args.variants.split(","):
        precision, share, *layout = spec.split(":")
        if precision not in ("fp32", "bf16") or layout not in ([], ["cl"]) or not share.replace(".", "", 1).isdigit():
            raise SystemExit(f"bad variant '{spec}': write precision:trunk_grad[:cl] with fp32 or bf16, e.g. bf16:0.1")
        if precision == "bf16" and not native.ok:
            skipped[spec] = f"bf16 is not native here ({native.reason})"
            continue
        weights = dataclasses.replace(base, trunk_grad=float(share))
        variants[spec] = (weights, AUTOCAST_DTYPES[precision], layout == ["cl"])

    def step(weights: EGCWeights, dtype: torch.dtype | None, channels_last: bool, seed: int) -> torch.nn.Module:
        net, batch = layouts[channels_last]
        net.zero_grad(set_to_none=True)
        loss, _ = egc_loss(net, schedule, batch, y, weights, torch.Generator().manual_seed(seed), dtype)
        loss.backward()
        return net

    fidelity, first = {}, None
    for spec, (weights, dtype, channels_last) in variants.items():
        g = _gradient(step(weights, dtype, channels_last, seed=0))
        if first is None:
            first = g
            continue
        cosine = torch.nn.functional.cosine_similarity(first, g, 0)
        fidelity[spec] = {"cosine": float(cosine), "norm_ratio": float(g.norm() / first.norm())}

    seconds: dict[str, list[float]] = {spec: [] for spec in variants}
    for r in range(args.rounds + 1):
        for spec, (weights, dtype, channels_last) in variants.items():
            start = time.perf_counter()
            for i in range(args.repeats):
                step(weights, dtype, channels_last, seed=1 + i)
            if r > 0:
                seconds[spec].append((time.perf_counter() - start) / args.repeats)

    reference = statistics.median(next(iter(seconds.values())))
    rows = {}
    for spec, values in seconds.items():
        median = statistics.median(values)
        rows[spec] = {
            "median_ms": 1000 * median,
            "min_ms": 1000 * min(values),
            "speedup": reference / median,
            **fidelity.get(spec, {}),
        }
        extra = "".join(f" {k} {v:.4f}" for k, v in fidelity.get(spec, {}).items())
        timing = f"median {1000 * median:7.1f} ms  min {1000 * min(values):7.1f}  ×{reference / median:.2f}"
        print(f"{spec:10s} {timing}{extra}")
    for spec, why in skipped.items():
        print(f"{spec:10s} skipped: {why}")
    settings = vars(args) | {"batch_size": config.train.batch_size}
    path = write_result(f"egc_step-{args.preset}", {"settings": settings, "variants": rows, "skipped": skipped})
    print(f"result: {path}")


if __name__ == "__main__":
    main()
