"""Network checks shared by the data and weight loaders: fail fast offline instead of hanging."""

from __future__ import annotations

import socket


def host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` (a quick offline check, no hang)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
