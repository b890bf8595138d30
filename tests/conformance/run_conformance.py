"""Run the Autobahn TestSuite against the server: `make conformance`.

1. Start the installed `twistd pubsub` with the echo endpoint and compression
   on and the message size limit raised to what the 9.x cases send (16 MiB).
2. Run every case with kosoku against /echo and require each case's
   `behavior` and `behaviorClose` to be OK, NON-STRICT or INFORMATIONAL.
   Check that the server's own fast path (not Autobahn's) opened every
   connection that offered no extension, and read the first frame of each
   that began with a whole or split text frame (/metrics).
3. Run the same cases against the pub/sub endpoint /, where the echo
   expectations fail by design and are not counted; then check that the
   server is still up, /healthz is back to zero connections, channels and
   patterns, and a pub/sub round trip works.
4. Stop the server with SIGTERM: it must exit 0 and its log must hold no
   traceback, unhandled error or error-level event.

The last line is `N passed, M failed` (cases against /echo, plus the
checks above).  Reports go to --reports (default reports/conformance).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
BIN = Path(sys.executable).parent


class Server:
    """The installed twistd pubsub as a child process, its output kept in memory."""

    def __init__(self, log_path: Path) -> None:
        command = [
            str(BIN / "twistd"), "-n", "--pidfile=", "pubsub",
            "--port", "tcp:0:interface=127.0.0.1",
            "--echo-endpoint", "--compression",
            # kosoku's 12.x/13.x cases mishandle an uncompressed message on a
            # compressed connection (RFC 7692 allows it), so compress all.
            "--compression-min-size", "0",
            "--max-message-size", str(MAX_MESSAGE_SIZE),
            # kosoku ends a case at the first frame it did not expect, and a
            # keepalive ping 30 s into section 12's longest cases is one.
            "--ping-interval", "0",
        ]  # fmt: skip
        self.log_path = log_path
        self.lines: list[str] = []
        self.port_found = threading.Event()
        self.port = 0
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            cwd=log_path.parent,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self.port_found.wait(60):
            self.process.kill()
            raise SystemExit("the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for line in self.process.stdout:
                self.lines.append(line)
                log.write(line)
                log.flush()
                match = re.search(r"Site starting on (\d+)", line)
                if match and not self.port_found.is_set():
                    self.port = int(match.group(1))
                    self.port_found.set()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def run_suite(url: str, outdir: Path, parallel: int, cases: list[str]) -> dict:
    if outdir.exists():
        shutil.rmtree(outdir)
    command = [str(BIN / "kosoku"), "-m", "fuzzingclient", "-p", str(parallel), "-o", str(outdir)]
    for case in cases:
        command += ["-i", case]
    print(f"running {' '.join(command)} {url}", flush=True)
    started = time.monotonic()
    outdir.mkdir(parents=True)
    with (outdir.parent / f"kosoku-{outdir.name}.log").open("w") as log:
        subprocess.run(command + [url], stdout=log, stderr=log, check=False, timeout=3600)
    print(f"  took {time.monotonic() - started:.0f} s", flush=True)
    with (outdir / "index.json").open() as stream:
        index = json.load(stream)
    [results] = index.values()
    return results


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return json.load(response)


def fast_path_figures(port: int) -> dict[str, float]:
    """/metrics' pubsub_websocket_fast_path_total for /echo, by step."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    return {
        sample.labels["step"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pubsub_websocket_fast_path_total" and sample.labels["endpoint"] == "echo"
    }


def fast_path_expected(reports: Path) -> dict[str, int]:
    """From the cases' reports: how many connections the fast path must have
    opened (no extension offered: compression is on, and an offer is
    Autobahn's to answer), and how many it must at least have read (of
    those, the ones whose first frame is a text frame, FIN and no RSV bits,
    of at most 65,535 bytes, that came back as text: valid UTF-8)."""
    expected = {"opened": 0, "read": 0}
    for path in reports.glob("*_case_*.json"):
        with path.open() as stream:
            case = json.load(stream)
        if "sec-websocket-extensions" in case["httpRequest"].lower():
            continue
        expected["opened"] += 1
        sent = next((entry for entry in case["wirelog"] if entry[0] == "TF"), None)
        echo = next((entry for entry in case["wirelog"] if entry[0] == "RF"), None)
        if sent is not None and echo is not None:
            size, opcode, fin, rsv = sent[1][0], sent[2], sent[3], sent[4]
            if opcode == 1 and fin and rsv == 0 and size <= 0xFFFF and echo[2] == 1:
                expected["read"] += 1
    return expected


def wait_for_idle(port: int, seconds: float = 30) -> dict:
    """/healthz once every connection the suite opened is gone (bounded wait)."""
    deadline = time.monotonic() + seconds
    while True:
        figures = health(port)
        if figures["connections"] == 0 or time.monotonic() > deadline:
            return figures
        time.sleep(0.2)


async def round_trip(port: int) -> bool:
    """Subscribe on one connection, publish on another, see the message arrive."""
    from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol

    loop = asyncio.get_running_loop()
    received: asyncio.Queue = asyncio.Queue()

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.factory.opened.set_result(self)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            received.put_nowait((self, json.loads(payload)))

    async def connect() -> Client:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/")
        factory.protocol = Client
        factory.opened = loop.create_future()
        await loop.create_connection(factory, "127.0.0.1", port)
        return await factory.opened

    subscriber, publisher = await connect(), await connect()
    subscriber.sendMessage(b'["SUBSCRIBE", "conformance"]')
    seen = [await received.get()]
    publisher.sendMessage(b'["PUBLISH", "conformance", "still here"]')
    seen += [await received.get(), await received.get()]
    subscriber.sendClose(1000)
    publisher.sendClose(1000)
    frames = sorted((client is subscriber, frame) for client, frame in seen)
    return frames == [
        (False, ["reply", 1]),
        (True, ["message", "conformance", "still here"]),
        (True, ["subscribe", "conformance", 1]),
    ]


def bad_log_lines(lines: list[str]) -> list[str]:
    pattern = re.compile(r"Traceback|Unhandled|#(error|critical)\]", re.IGNORECASE)
    return [line.rstrip() for line in lines if pattern.search(line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, default=Path("reports/conformance"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--case", action="append", default=[], help="only these cases (globs)")
    args = parser.parse_args()
    reports = args.reports.resolve()
    reports.mkdir(parents=True, exist_ok=True)

    server = Server(reports / "server.log")
    print(f"server on port {server.port}", flush=True)
    failures: list[str] = []

    results = run_suite(
        f"ws://127.0.0.1:{server.port}/echo", reports / "echo", args.parallel, args.case
    )
    passed = 0
    for case_id, result in sorted(
        results.items(), key=lambda item: [int(p) for p in item[0].split(".")]
    ):
        if result["behavior"] in ACCEPTED and result["behaviorClose"] in ACCEPTED:
            passed += 1
        else:
            detail = ""
            report = reports / "echo" / result.get("reportfile", "")
            if report.is_file():
                with report.open() as stream:
                    detail = json.load(stream).get("result", "")
            failures.append(f"{case_id}: {result['behavior']}/{result['behaviorClose']} {detail}")
    print(f"/echo: {passed} of {len(results)} cases OK", flush=True)
    checks = {}
    took = fast_path_figures(server.port)
    wanted = fast_path_expected(reports / "echo")
    checks[f"the fast path opened and read the suite's connections ({took} for {wanted})"] = (
        took.get("opened") == wanted["opened"] and took.get("read", 0) >= wanted["read"] > 0
    )

    run_suite(f"ws://127.0.0.1:{server.port}/", reports / "pubsub", args.parallel, args.case)
    checks["server still running after the suite on /"] = server.process.poll() is None
    figures = (
        wait_for_idle(server.port) if checks["server still running after the suite on /"] else {}
    )
    checks[f"/healthz back to zero ({figures})"] = bool(figures) and all(
        figures[key] == 0 for key in ("connections", "channels", "patterns", "shard_channels")
    )
    checks["pub/sub round trip afterwards"] = bool(figures) and asyncio.run(round_trip(server.port))
    exit_code = server.stop()
    bad = bad_log_lines(server.lines)
    checks[f"exit 0 on SIGTERM (got {exit_code}), no error in the log"] = exit_code == 0 and not bad
    for line in bad[:20]:
        print(f"  log: {line}")
    for name, ok in checks.items():
        print(f"check {'passed' if ok else 'FAILED'}: {name}")
        if ok:
            passed += 1
        else:
            failures.append(name)
    for failure in failures:
        print(f"FAILED {failure}")
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main())
