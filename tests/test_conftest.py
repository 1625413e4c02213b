"""The tests' own helpers (conftest.py)."""

import socket

from conftest import FIXED_PORTS, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    """Below the range that port-0 binds draw from, so a server the tests
    start on port 0 cannot take one before its process binds it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(FIXED_PORTS[0] <= p < min(FIXED_PORTS[1], ephemeral) for p in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
