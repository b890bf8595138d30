"""A TCP relay between a browser and a server process, whose connections a
test can cut: the network going away under a page, as neither the page nor
the server asks for it.

The browser tests run no reactor (Playwright's sync API), so the relay is
plain sockets and threads.
"""

from __future__ import annotations

import socket
import threading


class Relay:
    """Listens on a free loopback port and relays each connection to
    127.0.0.1:``target``.

    ``cut()`` closes every connection relayed at that moment, on both sides
    (the browser sees the TCP connection end without a close frame: 1006),
    and holds the connections made after it, unanswered, until ``restore()``:
    a page that reconnects meanwhile waits, and reaches the server only then.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._online = threading.Event()
        self._online.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._online.clear()
            cut, self._open = self._open, []
        for sock in cut:
            _close(sock)

    def restore(self) -> None:
        self._online.set()

    def close(self) -> None:
        self._closed = True
        self._online.set()
        _close(self._listener)
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                browser, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._relay, args=(browser,), daemon=True).start()

    def _relay(self, browser: socket.socket) -> None:
        self._online.wait()
        try:
            server = None if self._closed else socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            server = None
        if server is None:
            _close(browser)
            return
        with self._lock:
            held = not self._online.is_set()
            if not held:
                self._open += [browser, server]
        if held:
            # Cut between the wait and now: this one waits for the next restore.
            _close(server)
            self._relay(browser)
            return
        threading.Thread(target=_pump, args=(server, browser), daemon=True).start()
        _pump(browser, server)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    _close(source)
    _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
