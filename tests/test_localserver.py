"""free_port: a port is handed out once per process."""

from __future__ import annotations

import socket

from diloco.localserver import free_port


def test_free_port_is_never_handed_out_twice():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # and it is free
        s.bind(("127.0.0.1", ports[-1]))
