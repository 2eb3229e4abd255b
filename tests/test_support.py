"""The shared test helpers themselves, where a mistake in them would break other tests at random."""

from __future__ import annotations

import socket

from tests.support import free_port


def test_free_port_never_hands_out_a_port_twice():
    # A Ray node asks for nine ports before it binds any; 300 random picks from 10,000 ports would
    # repeat one almost surely (birthday bound) if free_port() only checked that a port is unbound.
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port < 30000 for port in ports)
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", ports[-1]))  # still free: nothing holds a port free_port() returned
