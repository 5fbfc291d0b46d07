"""The suite's own guard: a test that reaches for the network fails instead of downloading."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.quick


def test_a_public_address_is_refused_before_any_packet():
    with pytest.raises(OSError, match="tests never use the network"):
        socket.create_connection(("8.8.8.8", 53), timeout=1)


def test_loopback_stays_open_for_local_servers():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        with socket.create_connection(server.getsockname(), timeout=1):
            pass
    finally:
        server.close()
