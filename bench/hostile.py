"""The hostile scenario of ``make bench``: what malformed or trickled input costs the server.

``bench/run.py`` starts the servers (pubsub with a RESP port, and redis-server)
and calls :func:`run_cases` once per server and round.  Each case attacks
127.0.0.1 only, a bounded number of connections and bytes:

- ``*1000000000\\r\\n`` (a multibulk count of a billion) on each of N
  connections, then close; one connection after the other, and all N at once;
- a PUBLISH whose last bulk string declares 536,870,000 bytes, then close;
- a RESP PUBLISH of a 60 KiB payload, and a WebSocket text frame carrying
  ``["PUBLISH","c","<60 KiB>"]`` (pubsub only), trickled 1, 4 and 16 bytes per
  write.  Before each write the attacker waits until the server's socket has no
  unread byte (its ``rx_queue`` in ``/proc/net/tcp``) and its own send queue is
  empty, so every ``read()`` of the server returns one write's bytes.

Server CPU is the process CPU clock (``clock_gettime`` of the server's
process, in ns: the same ``utime + stime`` as ``/proc/PID/stat``, without its
10 ms ticks), read before the attack and again once every attacking socket is
closed on the server's side and a fresh client's PING was answered.  The
background of that window (the probe's pings, the server's timers, the fresh
client) is measured on the same server beforehand and subtracted.  A probe
process, a well-behaved client, PINGs every 10 ms during the attack; the
longest round trip is reported.

``python bench/hostile.py probe --proto resp|ws --port P`` is that probe.
Standard library only.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import math
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

HERE = Path(__file__).resolve()

HUGE_MULTIBULK = b"*1000000000\r\n"
HUGE_BULK = b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$536870000\r\n"
PROBE_INTERVAL = 0.01
RESP_PING = b"*1\r\n$4\r\nPING\r\n"
WS_PING = b'["PING"]'
TIMEOUT = 300.0  # seconds any one wait of a case may take before it fails


# ------------------------------------------------------------------ cases


def cases(scale: float) -> list[dict]:
    """Every case; connection counts and payload sizes times ``scale``."""
    conns = max(2, round(20 * scale))
    size = max(1024, round(60 * 1024 * scale))
    out = [
        {"name": "multibulk_seq", "proto": "resp", "attack": "burst", "data": HUGE_MULTIBULK,
         "connections": conns, "concurrent": False},
        {"name": "multibulk_conc", "proto": "resp", "attack": "burst", "data": HUGE_MULTIBULK,
         "connections": conns, "concurrent": True},
        {"name": "bigbulk_seq", "proto": "resp", "attack": "burst", "data": HUGE_BULK,
         "connections": conns, "concurrent": False},
    ]  # fmt: skip
    for proto in ("resp", "ws"):
        for step in (1, 4, 16):
            out.append(
                {"name": f"{proto}_trickle_{step}", "proto": proto, "attack": "trickle",
                 "size": size, "step": step, "connections": 1}
            )  # fmt: skip
    return out


def describe(case: dict) -> str:
    if case["attack"] == "burst":
        what = "`*1000000000`" if case["data"] == HUGE_MULTIBULK else "`$536870000` bulk"
        how = "at once" if case["concurrent"] else "one after another"
        return f"RESP {what}, {case['connections']} connections {how}"
    proto = "RESP PUBLISH" if case["proto"] == "resp" else "WebSocket frame"
    return f"{proto} of {case['size'] / 1024:g} KiB, {case['step']} B per write"


# -------------------------------------------------------------- measuring


def cpu_ns(pid: int) -> int:
    """The CPU time of process ``pid`` (all its threads), user and system, in ns."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of the process


def cpu_ticks(pid: int) -> int:
    """utime + stime from /proc/PID/stat, in clock ticks (a cross-check)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class TcpTable:
    """Server-side TCP sockets from /proc/net/tcp (IPv4, 127.0.0.1), read cheaply."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/net/tcp", os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def read(self) -> bytes:
        return os.pread(self.fd, 1 << 22, 0)

    def unread(self, server_port: int, client_port: int) -> int | None:
        """Bytes the server has received on this connection and not yet read."""
        needle = b"0100007F:%04X 0100007F:%04X " % (server_port, client_port)
        data = self.read()
        at = data.find(needle)
        if at < 0:
            return None
        # "st tx_queue:rx_queue", e.g. "01 00000000:00000004"
        fields = data[at + len(needle) : at + len(needle) + 21].split()
        return int(fields[1].split(b":")[1], 16)

    def held(self, server_port: int, client_ports: set[int]) -> int:
        """Connections from ``client_ports`` the server still holds open.

        ESTABLISHED (01) or CLOSE_WAIT (08) on the server's side: the server
        has not closed its socket yet, so it may still have bytes to handle.
        """
        local = b"0100007F:%04X" % server_port
        count = 0
        for line in self.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] != local or fields[3] not in (b"01", b"08"):
                continue
            if int(fields[2].split(b":")[1], 16) in client_ports:
                count += 1
        return count


def outq(sock: socket.socket) -> int:
    """Bytes in our send queue not yet acknowledged by the peer's kernel."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def recv_until(sock: socket.socket, done, timeout: float = TIMEOUT) -> bytes:
    """Read until ``done(data)`` holds; raises on EOF or timeout."""
    data = b""
    limit = time.monotonic() + timeout
    while not done(data):
        left = limit - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {timeout:g} s (got {data[:80]!r})")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server (got {data[:80]!r})")
        data += chunk
    return data


# --------------------------------------------------------------- WebSocket


def ws_handshake() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    return (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: pubsub.json\r\n\r\n"
    ).encode("ascii")


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (tests/support/wsframes.py, without its imports)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        header = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", size)
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", size)
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big")
    return header + mask + masked


def ws_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Whole unmasked server frames in ``data``, and the bytes after them."""
    frames = []
    while len(data) >= 2:
        size, at = data[1] & 0x7F, 2
        if size == 126:
            if len(data) < 4:
                break
            size, at = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            if len(data) < 10:
                break
            size, at = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < at + size:
            break
        frames.append((data[0] & 0x0F, data[at : at + size]))
        data = data[at + size :]
    return frames, data


def ws_connect(port: int) -> tuple[socket.socket, bytes]:
    """An open WebSocket (handshake done); the bytes sent for it."""
    sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = ws_handshake()
    sock.sendall(head)
    answer = recv_until(sock, lambda d: b"\r\n\r\n" in d)
    if not answer.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {answer[:80]!r}")
    return sock, head


# ------------------------------------------------------------------ probe


class Client:
    """A well-behaved client: PING, wait for the answer."""

    def __init__(self, proto: str, port: int) -> None:
        self.proto = proto
        if proto == "ws":
            self.sock, _ = ws_connect(port)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rest = b""

    def ping(self) -> float:
        """One PING's round trip in seconds."""
        start = time.perf_counter()
        if self.proto == "resp":
            self.sock.sendall(RESP_PING)
            recv_until(self.sock, lambda d: d.endswith(b"\r\n"))
            return time.perf_counter() - start
        self.sock.sendall(ws_frame(WS_PING))
        while True:
            self.rest += recv_until(self.sock, lambda d: len(d) > 0)
            frames, self.rest = ws_frames(self.rest)
            for opcode, payload in frames:
                if opcode == 0x9:  # the server's ping: answer as a client should
                    self.sock.sendall(ws_frame(payload, 0xA))
                elif opcode == 0x1:
                    return time.perf_counter() - start

    def close(self) -> None:
        self.sock.close()


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read a byte at a time so nothing past it is taken."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    return line


def probe_main(proto: str, port: int, interval: float) -> None:
    """From a "go" line on stdin, PING every ``interval`` until the next line; print the RTTs.

    The first PING goes with the attack's first bytes, so even an attack over
    in a millisecond has one.
    """
    client = Client(proto, port)
    client.ping()
    print("ready", flush=True)
    # Lines are read from the descriptor itself: a buffered readline() could
    # take "stop" along with "go" when the attack is over at once, and
    # select() would then wait for it forever.
    stdin = sys.stdin.fileno()
    _read_line(stdin)
    rtts = []
    while True:
        rtts.append(client.ping())
        ready, _, _ = select.select([stdin], [], [], interval)
        if ready:
            _read_line(stdin)
            break
    print(json.dumps({"pings": len(rtts), "rtt_max_s": max(rtts, default=None),
                      "rtt_median_s": statistics.median(rtts) if rtts else None}), flush=True)  # fmt: skip
    sys.stdin.read()  # close only after the parent's last CPU reading
    client.close()


class Probe:
    """The probe process, pinging from ``start`` until ``stop``."""

    def __init__(self, proto: str, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "probe", "--proto", proto, "--port", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"probe did not start: {line!r}")

    def go(self) -> None:
        self.proc.stdin.write("go\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(30)


def fresh_ping(proto: str, port: int) -> None:
    client = Client(proto, port)
    try:
        client.ping()
    finally:
        client.close()


# ---------------------------------------------------------------- attacks


def burst(port: int, case: dict) -> tuple[int, int, set[int]]:
    """Send ``case['data']`` on each of N connections and close them; (bytes, writes, ports)."""
    ports: set[int] = set()
    socks: list[socket.socket] = []
    for _ in range(case["connections"]):
        sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        ports.add(sock.getsockname()[1])
        if case["concurrent"]:
            socks.append(sock)
            continue
        sock.sendall(case["data"])
        sock.close()
    for sock in socks:
        sock.sendall(case["data"])
    for sock in socks:
        sock.close()
    return len(case["data"]) * case["connections"], case["connections"], ports


def trickle(port: int, case: dict, table: TcpTable) -> tuple[int, int, set[int]]:
    """One request trickled ``step`` bytes per write, each write read alone by the server."""
    payload = b"x" * case["size"]
    if case["proto"] == "ws":
        sock, head = ws_connect(port)
        data = ws_frame(b'["PUBLISH","c","' + payload + b'"]')
        sent = len(head)
    else:
        sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$%d\r\n%s\r\n" % (len(payload), payload)
        sent = 0
    client_port = sock.getsockname()[1]
    step = case["step"]
    writes = 0
    try:
        for at in range(0, len(data), step):
            sock.sendall(data[at : at + step])
            writes += 1
            limit = time.monotonic() + TIMEOUT
            # Busy-wait: a sleep would cost more than the server's read.
            while outq(sock) or table.unread(port, client_port):
                if time.monotonic() > limit:
                    raise TimeoutError(f"the server did not read write {writes} in time")
        # The reply (":0" or ["publish",...]) says the request was handled.
        recv_until(sock, lambda d: len(d) > 0)
    finally:
        sock.close()
    return sent + len(data), writes, {client_port}


# ------------------------------------------------------------------- runs


def wait_released(table: TcpTable, port: int, ports: set[int]) -> None:
    limit = time.monotonic() + TIMEOUT
    while table.held(port, ports):
        if time.monotonic() > limit:
            raise TimeoutError("the server still holds attacking connections")
        time.sleep(0.002)


def background(pid: int, proto: str, port: int, seconds: float) -> dict:
    """The server's CPU without an attack: per second with the probe on, and a fresh PING."""
    probe = Probe(proto, port)
    try:
        t0, c0 = time.monotonic(), cpu_ns(pid)
        probe.go()
        time.sleep(seconds)
        pings = probe.stop()
        rate = (cpu_ns(pid) - c0) / (time.monotonic() - t0)
    finally:
        probe.close()
    fresh = []
    for _ in range(5):
        c0 = cpu_ns(pid)
        fresh_ping(proto, port)
        fresh.append(cpu_ns(pid) - c0)
        time.sleep(0.02)
    return {"ns_per_s": rate, "fresh_ns": statistics.median(fresh),
            "idle_rtt_max_s": pings["rtt_max_s"]}  # fmt: skip


def run_case(pid: int, port: int, case: dict, base: dict, table: TcpTable) -> dict:
    probe = Probe(case["proto"], port)
    try:
        t0, c0, k0 = time.monotonic(), cpu_ns(pid), cpu_ticks(pid)
        probe.go()
        if case["attack"] == "burst":
            sent, writes, ports = burst(port, case)
        else:
            sent, writes, ports = trickle(port, case, table)
        attack_s = time.monotonic() - t0
        wait_released(table, port, ports)
        pings = probe.stop()
        fresh_ping(case["proto"], port)
        c1, k1 = cpu_ns(pid), cpu_ticks(pid)
        window = time.monotonic() - t0
    finally:
        probe.close()
    raw = c1 - c0
    net = max(0.0, raw - base["ns_per_s"] * window - base["fresh_ns"])
    return {
        "case": case["name"],
        "bytes": sent,
        "writes": writes,
        "connections": case["connections"],
        "attack_s": attack_s,
        "window_s": window,
        "cpu_raw_ms": raw / 1e6,
        "cpu_background_ms": (raw - net) / 1e6,
        "cpu_ms": net / 1e6,
        "cpu_ms_per_connection": net / 1e6 / case["connections"],
        "cpu_us_per_byte": net / 1e3 / sent,
        "ticks": k1 - k0,
        "ping_max_ms": pings["rtt_max_s"] * 1e3 if pings["rtt_max_s"] is not None else None,
        "pings": pings["pings"],
    }


def run_cases(kind: str, pid: int, ports: dict[str, int], specs: list[dict]) -> list[dict]:
    """Every case that applies to ``kind`` on one running server, in order."""
    table = TcpTable()
    out = []
    try:
        bases = {}
        for case in specs:
            port = ports.get(case["proto"])
            if port is None:
                continue  # Redis has no WebSocket
            try:
                if case["proto"] not in bases:
                    bases[case["proto"]] = background(pid, case["proto"], port, 1.0)
                result = run_case(pid, port, case, bases[case["proto"]], table)
                result["background"] = bases[case["proto"]]
            except (OSError, RuntimeError, ValueError) as error:
                result = {"case": case["name"], "error": f"{type(error).__name__}: {error}"}
            out.append(result)
    finally:
        table.close()
    return out


# ---------------------------------------------------------------- report


def summary(results: dict, specs: list[dict]) -> str:
    """The table: ``results`` is {case: {server: [per-round result]}}."""

    def med(case: str, server: str, key: str) -> float | None:
        values = [
            r[key]
            for r in results.get(case, {}).get(server, [])
            if "error" not in r and r.get(key) is not None
        ]
        return statistics.median(values) if values else None

    def num(value: float | None, style: str) -> str:
        if value is None:
            return "-"
        if style == "sig":  # three significant digits, thousands separated
            digits = max(0, 2 - math.floor(math.log10(abs(value)))) if value else 0
            return f"{value:,.{digits}f}"
        return style.format(value)

    lines = [
        (
            "| attack | bytes per connection | pubsub CPU per connection (ms) | pubsub CPU per "
            "byte (us) | Redis CPU per connection (ms) | Redis CPU per byte (us) | pubsub/Redis "
            "| PING max under attack, pubsub / Redis (ms) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in specs:
        name = case["name"]
        if name not in results:
            continue
        ps_ms = med(name, "pubsub", "cpu_ms_per_connection")
        rd_ms = med(name, "redis", "cpu_ms_per_connection")
        ps_b = med(name, "pubsub", "cpu_us_per_byte")
        rd_b = med(name, "redis", "cpu_us_per_byte")
        q = ps_b / rd_b if ps_b is not None and rd_b else None
        per_conn = med(name, "pubsub", "bytes") or med(name, "redis", "bytes")
        per_conn = per_conn / case["connections"] if per_conn else None
        ping = (
            f"{num(med(name, 'pubsub', 'ping_max_ms'), 'sig')} / "
            f"{num(med(name, 'redis', 'ping_max_ms'), 'sig')}"
        )
        lines.append(
            f"| {describe(case)} | {num(per_conn, '{:,.0f}')} | {num(ps_ms, 'sig')} "
            f"| {num(ps_b, 'sig')} | {num(rd_ms, 'sig')} | {num(rd_b, 'sig')} "
            f"| {num(q, 'sig')} | {ping} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="the hostile scenario's probe client")
    parser.add_argument("role", choices=["probe"])
    parser.add_argument("--proto", choices=["resp", "ws"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=PROBE_INTERVAL)
    args = parser.parse_args()
    probe_main(args.proto, args.port, args.interval)


if __name__ == "__main__":
    main()
