"""Instructions the server executes per WebSocket connect, trickled read and publish, by valgrind.

``bench/connect_cost.py`` measures in CPU time, which moves with whatever else
the machine runs. Instructions do not: this runs it under ``valgrind
--tool=callgrind`` twice, with ``--size`` 200 and 400, and divides the
difference of the two totals by 200, so start-up and the one-off costs cancel
out. Each connection is also closed in the run, so the figure is a connect,
its SUBSCRIBE and its close. The same with ``--trickle`` 10,000 and 20,000
gives the instructions of one 1-byte read of a frame sent a byte at a time
(the hostile scenario's WebSocket trickle, without its system calls), by the
lean reader and by Autobahn's (which reads what the lean one leaves to it:
compressed frames, control frames, fragments). ``--publishes`` 2,000 and
4,000 give one PUBLISH to ten subscribers: the command, its reply and the
ten deliveries, with their send() calls (a checkout whose connect_cost.py
predates ``--publishes`` cannot give it).

Python seeds its string hashes at random in each process, and how the names
of a connection's attribute dict collide moves the count by thousands of
instructions; every run here uses the seeds given (the same for every
checkout compared). The libraries move it too (the project's development
venv counts tens of thousands more per connect than one with only the
runtime dependencies, for the same code), so another checkout's code runs
with this script's Python and libraries: ``connect_cost.py`` puts its own
checkout first on ``sys.path``.

    .venv/bin/python bench/connect_instructions.py                    # this checkout
    .venv/bin/python bench/connect_instructions.py --checkout ../old  # another one's code
    .venv/bin/python bench/connect_instructions.py --policies  # every built-in policy on
    .venv/bin/python bench/connect_instructions.py --history   # channels with a history, RESUMEd

Needs valgrind. Takes about a minute per seed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _total(python: Path, script: Path, options: list[str], seed: int, out: Path) -> int:
    """The instructions of one run of ``script`` with ``options``."""
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", str(python), str(script)]
        + options,
        env={**os.environ, "PYTHONHASHSEED": str(seed)},
        check=True,
        capture_output=True,
    )
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no summary line in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--python", type=Path, default=Path(sys.executable), help="default: this one"
    )
    parser.add_argument(
        "--policies", action="store_true", help="connect_cost.py --policies: tokens, origins, ..."
    )
    parser.add_argument(
        "--history", action="store_true", help="connect_cost.py --history: positions, RESUME"
    )
    args = parser.parse_args()
    extra = ["--policies"] * args.policies + ["--history"] * args.history
    checkout = args.checkout.resolve()
    python = args.python
    script = checkout / "bench" / "connect_cost.py"
    measures = (
        ("connect", lambda n: ["--batches", "1", "--size", str(n)], (200, 400)),
        ("1-byte read", lambda n: ["--trickle", str(n)], (10_000, 20_000)),
        ("1-byte read by Autobahn", lambda n: ["--trickle", str(n), "--autobahn"], (5_000, 10_000)),
        ("publish to 10 subscribers", lambda n: ["--publishes", str(n)], (2_000, 4_000)),
    )
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for name, options, (small, large) in measures:
                totals = [
                    _total(
                        python, script, options(n) + extra, seed, Path(scratch) / f"cg.{seed}.{n}"
                    )
                    for n in (small, large)
                ]
                per = (totals[1] - totals[0]) / (large - small)
                print(f"{checkout}: PYTHONHASHSEED={seed}: {per:,.0f} instructions per {name}")


if __name__ == "__main__":
    main()
