"""Addresses and ports: where to reach a server that listens on a given host, and free ports.

A server told to listen on every interface (``0.0.0.0``, ``""``, ``::``) is probed on loopback
(``127.0.0.1``, or ``::1`` for IPv6); any other host is probed where it listens.  IPv6 hosts go in
brackets in URLs and ``HOST:PORT`` strings.
"""

from __future__ import annotations

import socket

from ..errors import ConfigError

#: Hosts that mean "every interface", and the loopback address to probe each on.
_ANY_HOST = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def probe_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on ``host``."""
    return _ANY_HOST.get(host, host)


def host_port(host: str, port: int) -> str:
    """``HOST:PORT`` for a URL or an nginx ``listen``: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now at ``host`` (the OS picks it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int, option: str) -> None:
    """A :class:`ConfigError` naming ``option`` when ``port`` cannot be listened on at ``host``."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver does
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{option} {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
