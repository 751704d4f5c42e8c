"""`python -m benchmarks.sgld` end to end at toy size: the record has its protocol, allocator state and faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sgld_benchmark_writes_a_complete_record(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--rounds", "2", "--warmup", "0", "--steps", "2", "--batch", "8", "--threads", "1"]
    modes = ["--modes", "fast-bf16-nhwc", "explicit-bf16-nhwc", "--out", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.sgld", *args, *modes],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    record = json.loads(Path(json.loads(out.stdout.strip().splitlines()[-1])["result"]).read_text())
    assert record["malloc"]["tuned"] is True and record["machine"]["malloc"]["tuned"] is True
    table = record["step"]["table"]
    assert set(table) == {"reference-eager", "fast-bf16-nhwc", "explicit-bf16-nhwc"}
    for row in table.values():
        assert row["median_ms"] > 0 and row["n"] == 2 and row["minor_faults_per_step"] >= 0
    assert table["reference-eager"]["speedup"] == 1.0
    assert "page faults/step" in record["markdown"] and "git_sha" in record
