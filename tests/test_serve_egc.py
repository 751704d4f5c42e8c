"""The demo server on an EGC checkpoint: DDIM chains kept on the server by id, SDEdit-style refine."""

from __future__ import annotations

import pytest
import torch

from jemlab.run import load_run
from jemlab.serve.actions import build_actions, model_kind
from jemlab.serve.app import DemoApp, RequestError
from serve_support import tiny_run

TINY_EGC = [
    ("model.options", {"width": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "patch": 2, "attention": []}),
    ("egc.sample_steps", 4),
    ("egc.ema", 0.9),
]


@pytest.fixture(scope="module")
def egc_app(tmp_path_factory):
    run = load_run(tiny_run(tmp_path_factory.mktemp("serve-egc"), "egc", TINY_EGC), device="cpu")
    assert model_kind(run) == "egc"
    return DemoApp(build_actions(run), None, reference_note="none")


def test_egc_chains_continue_by_id_and_stop_after_the_schedule(egc_app):
    assert egc_app.info()["kind"] == "egc"
    first = egc_app.chains({"mode": "per_class", "steps": 0, "seed": 1})
    chain_id = first["chain_id"]
    assert len(first["images"]) == 10
    second = egc_app.chains({"mode": "per_class", "steps": 3, "chain_id": chain_id})
    assert second["chain_id"] == chain_id and second["images"] != first["images"]
    third = egc_app.chains({"mode": "per_class", "steps": 1, "chain_id": chain_id})  # the 4th and last step
    done = egc_app.chains({"mode": "per_class", "steps": 5, "chain_id": chain_id})  # past the end: unchanged
    assert done["images"] == third["images"]
    stored, _, position, _ = egc_app.stored_chains[chain_id]
    assert position == 9 and float(stored.abs().max()) <= 1.0


def test_egc_chain_requests_are_checked(egc_app):
    with pytest.raises(RequestError, match="unknown or expired"):
        egc_app.chains({"mode": "unconditional", "n": 2, "steps": 1, "chain_id": "nope"})
    with pytest.raises(RequestError, match="by 'chain_id'"):
        egc_app.chains({"mode": "unconditional", "n": 1, "steps": 1, "images": [[0.0] * 784]})
    started = egc_app.chains({"mode": "unconditional", "n": 2, "steps": 0})
    with pytest.raises(RequestError, match="another mode or size"):
        egc_app.chains({"mode": "unconditional", "n": 3, "steps": 1, "chain_id": started["chain_id"]})
    for _ in range(egc_app.limits.max_stored_chains):
        egc_app.chains({"mode": "unconditional", "n": 1, "steps": 0})
    assert started["chain_id"] not in egc_app.stored_chains  # the oldest state was dropped
    assert len(egc_app.stored_chains) == egc_app.limits.max_stored_chains


def test_egc_refine_denoises_the_remaining_steps(egc_app):
    drawing = [float((i % 28) in (10, 11, 12)) for i in range(784)]
    result = egc_app.refine({"pixels": drawing, "steps": 40, "frames": 10, "seed": 3})
    # 4 DDIM steps, the drawing entering with 40% of them left: round(0.6 * 4) = 2, so 2 steps and 2 frames.
    assert result["steps"] == 2 and len(result["frames"]) == 2
    assert all(0.0 <= v <= 1.0 for v in result["frames"][-1]["pixels"])
    again = egc_app.refine({"pixels": drawing, "steps": 40, "frames": 10, "seed": 3})
    assert again["frames"][-1]["pixels"] == result["frames"][-1]["pixels"]
    assert torch.isfinite(torch.tensor(result["frames"][-1]["energy"]))
