"""The demo server's HTTP API against a tiny trained checkpoint: answers, bounds, refusals, and the chain GIF."""

from __future__ import annotations

import http.client
import json

import pytest
import torch
from PIL import Image

from jemlab.cli import main
from jemlab.errors import JemlabError
from jemlab.run import load_run
from jemlab.serve import ACTION_FACTORIES, DemoApp, Limits, build_actions, create_app
from jemlab.serve.actions import model_kind
from jemlab.serve.server import TokenBucket
from serve_support import serving, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def app(run_dir):
    return create_app(run_dir, reference_size=64)


@pytest.fixture(scope="module")
def server(app):
    with serving(app) as server:
        yield server


def request(server, method, path, body=None, headers=None, raw=None):
    """(status, parsed JSON or bytes) of one request; a fresh connection each time."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    connection.request(method, path, body=data, headers=all_headers)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    if response.getheader("Content-Type") == "application/json":
        return response.status, json.loads(payload)
    return response.status, payload


BLANK = [0.0] * 784


def stripes():
    return [float((i // 28) % 4 == 0) for i in range(784)]


def test_info_describes_the_model(server):
    status, info = request(server, "GET", "/api/info")
    assert status == 200
    assert info["kind"] == "jem" and info["image_shape"] == [1, 28, 28] and len(info["class_names"]) == 10
    assert info["reference"]["size"] == 64 and 0 <= info["reference"]["accuracy"] <= 1
    assert info["limits"]["max_refine_steps"] == Limits().max_refine_steps


def test_predict_matches_the_model(server, run_dir):
    status, result = request(server, "POST", "/api/predict", {"pixels": stripes()})
    assert status == 200
    probs = result["probs"]
    assert abs(sum(probs) - 1) < 1e-3 and result["predicted"] == max(range(10), key=probs.__getitem__)
    # Known answer: the energy is the loaded model's E(x) of the same image.
    run = load_run(run_dir, device="cpu")
    x = torch.tensor(stripes()).view(1, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        expected = float(run.model.energy(x))
    assert result["energy"] == pytest.approx(expected, abs=1e-3)
    assert 0 <= result["percentile"] <= 1 and 0 <= result["grad_percentile"] <= 1
    assert result["verdict"] in ("in-distribution", "out-of-distribution")


def test_refine_animates_and_is_reproducible(server):
    body = {"pixels": stripes(), "steps": 7, "frames": 3, "seed": 4}
    status, result = request(server, "POST", "/api/refine", body)
    assert status == 200
    assert [frame["step"] for frame in result["frames"]] == [3, 5, 7]
    for frame in result["frames"]:
        assert len(frame["pixels"]) == 784 and min(frame["pixels"]) >= 0 and max(frame["pixels"]) <= 1
    assert request(server, "POST", "/api/refine", body)[1] == result
    status, conditional = request(server, "POST", "/api/refine", {**body, "label": 3})
    assert status == 200 and conditional["label"] == 3


def test_chains_start_and_continue(server):
    status, first = request(server, "POST", "/api/chains", {"mode": "unconditional", "n": 4, "steps": 0})
    assert status == 200 and len(first["images"]) == 4 and first["labels"] is None
    body = {"mode": "unconditional", "n": 4, "steps": 2, "images": first["images"]}
    status, second = request(server, "POST", "/api/chains", body)
    assert status == 200 and second["images"] != first["images"] and len(second["energy"]) == 4
    status, per_class = request(server, "POST", "/api/chains", {"mode": "per_class", "steps": 1})
    assert status == 200 and per_class["labels"] == list(range(10))
    status, one = request(server, "POST", "/api/chains", {"mode": "class", "label": 2, "n": 3, "steps": 1})
    assert status == 200 and one["labels"] == [2, 2, 2]


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/api/predict", {"pixels": BLANK[:10]}, "784 numbers"),
        ("/api/predict", {"pixels": [2.0] * 784}, "in [0, 1]"),
        ("/api/predict", {"pixels": ["a"] * 784}, "only numbers"),
        ("/api/predict", {"pixels": BLANK, "path": "/etc/passwd"}, "unknown field"),
        ("/api/refine", {"pixels": BLANK, "steps": 10_000}, "'steps'"),
        ("/api/refine", {"pixels": BLANK, "frames": 0}, "'frames'"),
        ("/api/refine", {"pixels": BLANK, "label": 10}, "'label'"),
        ("/api/refine", {"pixels": BLANK, "label": True}, "'label'"),
        ("/api/chains", {"mode": "everything"}, "'mode'"),
        ("/api/chains", {"mode": "class"}, "needs a 'label'"),
        ("/api/chains", {"n": 1000}, "'n'"),
        ("/api/chains", {"steps": 51}, "'steps'"),
        ("/api/chains", {"n": 2, "images": [BLANK]}, "list of 2 images"),
    ],
)
def test_bad_requests_get_400_with_a_message(server, path, body, needle):
    status, result = request(server, "POST", path, body)
    assert status == 400 and needle in result["error"]


def test_protocol_refusals(server):
    assert request(server, "POST", "/api/predict", raw=b"{not json")[0] == 400
    assert request(server, "POST", "/api/predict", raw=b"[1, 2]")[1] == {"error": "body must be a JSON object"}
    status, result = request(server, "POST", "/api/predict", raw=b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in result["error"]
    # An oversized body is refused from its Content-Length alone, before it is read.
    too_big = {"Content-Length": str(Limits().max_body_bytes + 1)}
    assert request(server, "POST", "/api/predict", raw=b"{}", headers=too_big)[0] == 413
    assert request(server, "POST", "/api/nothing", {})[0] == 404
    assert request(server, "GET", "/api/nothing")[0] == 404
    # Paths never reach the file system: only the fixed static table is served.
    for path in ("/../../../etc/passwd", "/static/../server.py", "/app.js/../../actions.py", "//etc/passwd"):
        assert request(server, "GET", path)[0] == 404
    # A request for another host name (DNS rebinding) is refused while bound to loopback.
    assert request(server, "GET", "/api/info", headers={"Host": "evil.example:80"})[0] == 403
    assert request(server, "POST", "/api/predict", {"pixels": BLANK}, headers={"Host": "evil.example"})[0] == 403


def test_static_page(server):
    status, html = request(server, "GET", "/")
    assert status == 200 and b'<canvas id="draw"' in html and b"/app.js" in html
    status, script = request(server, "GET", "/app.js")
    assert status == 200 and b"/api/predict" in script


def test_rate_limit_answers_429(app):
    limited = DemoApp(app.actions, app.reference, limits=Limits(requests_per_second=0.001, burst=2))
    with serving(limited) as server:
        statuses = [request(server, "POST", "/api/predict", {"pixels": BLANK})[0] for _ in range(4)]
    assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]


def test_token_bucket_refills():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 0.5  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]


def test_no_reference_means_no_verdict(app):
    blind = DemoApp(app.actions, None, reference_note="no reference set")
    result = blind.predict({"pixels": BLANK})
    assert result["verdict"] == "unknown" and result["percentile"] is None
    assert blind.info()["reference"] is None and blind.info()["reference_note"] == "no reference set"


def test_actions_are_chosen_by_model_kind(run_dir, monkeypatch):
    run = load_run(run_dir, device="cpu")
    assert model_kind(run) == "jem"
    run.meta["kind"] = "flow"
    with pytest.raises(JemlabError, match="no actions for model kind 'flow'"):
        build_actions(run)
    seen = []
    monkeypatch.setitem(ACTION_FACTORIES, "flow", lambda r: seen.append(r) or ACTION_FACTORIES["jem"](r))
    assert build_actions(run).kind == "jem" and seen == [run]


def test_sample_animate_writes_a_gif(run_dir, tmp_path, capsys):
    gif = tmp_path / "chain.gif"
    npz = tmp_path / "final.npz"
    args = ["sample", "--checkpoint", str(run_dir), "--num", "2", "--per-class", "--steps", "6", "--frames", "3"]
    assert main([*args, "--animate", str(gif), "--out", str(npz)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["animate"] == str(gif) and report["frames"] == 4 and npz.exists()
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 4  # the start and three snapshots
    assert main(["sample", "--checkpoint", str(run_dir)]) == 2
    assert "--animate" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(run_dir), "--animate", str(tmp_path / "x.png")]) == 2


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--reference-size", "20000"]) == 2
    assert "at most 10000" in capsys.readouterr().err
