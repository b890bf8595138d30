"""What ``pubsub.core.history.History`` (this checkout's) takes per stored message.

``run.py`` calls :func:`measure` when it runs the ``fanout_history`` scenario;
alone: ``.venv/bin/python bench/history_memory.py``.  Two measurements of the
same fill (payloads of the fanout scenario's size, each its own bytes object
as each publish's is, appended round robin to 100 channels, bounds that drop
nothing), against what the history counts itself (``stored_bytes /
stored_messages``: payload + ``MESSAGE_OVERHEAD``, the figure
``history_max_bytes`` bounds):

* tracemalloc, in-process, 20,000 messages: the bytes Python asked its
  allocator for, streams included (``allocated``) and for the messages after
  each channel's first (``marginal``).  pymalloc hands out blocks rounded up
  to 16 bytes, which tracemalloc does not see;
* the growth of ``VmRSS`` over a fill of 200,000 messages in a fresh Python
  process (``rss``): the rounding and the pools included.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = "fanout"


def _history(messages: int, channels: int):  # -> (History, module)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the checkout's package, not an installed one
    from pubsub.core import history as module

    history = module.History(
        [f"{CHANNEL}.*".encode()],
        size=-(-messages // channels),
        ttl=1e9,
        max_bytes=1 << 60,
        max_channels=channels,
        clock=time.monotonic,  # a float per message, as the server's clock
    )
    return history, module


def _payloads(length: int):
    pad = b"x" * length
    return lambda i: (b"%010d:%016d:" % (i, i) + pad)[:length]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def traced(payload_length: int, messages: int = 20_000, channels: int = 100) -> dict:
    names = [f"{CHANNEL}.{i}".encode() for i in range(channels)]
    payload = _payloads(payload_length)
    gc.collect()
    tracemalloc.start()
    try:
        history, module = _history(messages, channels)
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(channels):  # each channel's first message: its stream too
            history.append(names[i], payload(i))
        first = tracemalloc.get_traced_memory()[0]
        for i in range(channels, messages):
            history.append(names[i % channels], payload(i))
        gc.collect()
        full = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    if history.stored_messages != messages or history.evicted:
        raise RuntimeError(f"the history kept {history.stored_messages} of {messages} messages")
    return {
        "module": module.__file__,
        "messages": messages,
        "channels": channels,
        "payload_bytes": payload_length,
        "allocated_bytes_per_message": (full - base) / messages,
        "marginal_bytes_per_message": (full - first) / (messages - channels),
        "counted_bytes_per_message": history.stored_bytes / history.stored_messages,
        "message_overhead": module.MESSAGE_OVERHEAD,
    }


def rss(payload_length: int, messages: int = 200_000, channels: int = 100) -> dict:
    names = [f"{CHANNEL}.{i}".encode() for i in range(channels)]
    payload = _payloads(payload_length)
    history, _ = _history(messages, channels)
    gc.collect()
    before = _rss()
    for i in range(messages):
        history.append(names[i % channels], payload(i))
    gc.collect()
    grown = _rss() - before
    if history.stored_messages != messages or history.evicted:
        raise RuntimeError(f"the history kept {history.stored_messages} of {messages} messages")
    return {"rss_messages": messages, "rss_bytes_per_message": grown / messages}


def measure(payload_length: int) -> dict:
    """Both measurements; the RSS one in a fresh process of the same Python."""
    try:
        figures = traced(payload_length)
        done = subprocess.run(
            [sys.executable, __file__, "--rss", str(payload_length)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        figures.update(json.loads(done.stdout))
    except (ImportError, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rss"]:
        print(json.dumps(rss(int(sys.argv[2]))))
    else:
        print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 64), indent=1))
