"""Screenshot of `jemlab serve` for the README: serve a checkpoint, draw a trouser, run per-class chains.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/serve_screenshot.py --checkpoint runs/fashion-mnist \
        --out docs/serve-screenshot.png

Needs the test extra (selenium) and Chromium with chromedriver.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from jemlab.serve import create_app
from jemlab.serve.browser import demo_session
from serve_support import serving


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--out", default="docs/serve-screenshot.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--chain-ticks", type=int, default=20, help="live-view requests of 5 steps each")
    args = parser.parse_args()
    app = create_app(args.checkpoint, reference_size=1000)
    with serving(app) as server:
        state = demo_session(server.url, args.out, chain_ticks=args.chain_ticks)
    print(json.dumps({"out": args.out, **state}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
