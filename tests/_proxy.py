"""A TCP proxy for the fault tests: a broker that hangs, goes down and comes back.

`Proxy` listens on 127.0.0.1 and relays each connection to an upstream port
(moto's SQS server), one thread per direction. Between the application and
its broker it plays the network's part:

- `stall`: connections are accepted but nothing is relayed any more, in
  either direction: requests hang, as with a broker that stopped answering;
- `down`: the port is closed and every connection cut: connecting is refused;
- `heal`: connections held by a stall are cut (what they carried is never
  relayed), the port listens again, and traffic flows.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress


class _Link:
    """One relayed connection: the application's socket and the upstream one."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self.cut_off = False
        self._pumps_left = 2
        self._lock = threading.Lock()

    def cut(self) -> None:
        """Shut both sockets down: wakes both pumps (only the pumps close the sockets)."""
        self.cut_off = True
        for sock in self.sockets:
            with suppress(OSError):  # already shut down, or never connected
                sock.shutdown(socket.SHUT_RDWR)

    def pump_done(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            for sock in self.sockets:
                sock.close()


class Proxy:
    """Relays 127.0.0.1:`port` to 127.0.0.1:*upstream_port*; see the module docs."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._held = 0
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0
        self._listen()

    @property
    def endpoint(self) -> str:
        """The ``endpoint_url`` that reaches the upstream server through the proxy."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def held(self) -> int:
        """How many relays hold data back (a stall caught them with data to relay)."""
        return self._held

    def stall(self) -> None:
        """Relay nothing more: data in flight stays in the proxy, requests hang."""
        self._flowing.clear()

    def down(self) -> None:
        """Close the port (connecting is refused) and cut every connection."""
        listener, acceptor = self._listener, self._acceptor
        self._listener = self._acceptor = None
        if listener is not None and acceptor is not None:
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); the acceptor closes it
            acceptor.join(timeout=5)
        self._cut_all()

    def heal(self) -> None:
        """Cut what a stall held, listen again if down, and relay traffic again."""
        if not self._flowing.is_set():
            self._cut_all()
        if self._listener is None:
            self._listen()
        self._flowing.set()

    def close(self) -> None:
        """Stop for good."""
        self.down()
        self._flowing.set()

    # -- threads ------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))  # the same port again after `down`
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:  # shut down by `down`
                    return
                try:
                    upstream = socket.create_connection(self._upstream, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                client.settimeout(None)
                link = _Link(client, upstream)
                with self._lock:
                    self._links.add(link)
                for source, target in ((client, upstream), (upstream, client)):
                    pump = threading.Thread(
                        target=self._pump, args=(link, source, target), daemon=True
                    )
                    pump.start()

    def _pump(self, link: _Link, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self._flowing.is_set():
                    with self._lock:
                        self._held += 1
                    self._flowing.wait()
                    with self._lock:
                        self._held -= 1
                if link.cut_off:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            link.cut()
            with self._lock:
                self._links.discard(link)
            link.pump_done()

    def _cut_all(self) -> None:
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut()
