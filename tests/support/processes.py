"""Run a server as a child process on the reactor and learn the port it bound."""

from __future__ import annotations

import re

from twisted.internet import defer, protocol


class ServerProcess(protocol.ProcessProtocol):
    """Collects output; ``listening`` fires with the port that ``ready`` captures.

    ``ended`` fires with the exit code (None when a signal ended the process).
    """

    def __init__(self, ready: bytes) -> None:
        self._ready = re.compile(ready)
        self.output = b""
        self.listening: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = self._ready.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value.exitCode)
