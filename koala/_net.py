"""Network addresses: the one ``HOST:PORT`` parser and the one loopback check.

A leaf module. The loopback check is a security decision (who may listen, or be
dialled, without the cluster secret or TLS), so the command line and the transport
ask this one function.
"""

from __future__ import annotations

import ipaddress


def split_hostport(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``, port 0-65535; ValueError
    saying what is wrong. An IPv6 literal needs its brackets (``::1:80`` is ambiguous)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"the port of {value!r} must be a number from 0 to 65535")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{value!r} has unbalanced brackets around its host")
        return host[1:-1], int(port)
    if ":" in host or "]" in host:
        raise ValueError(f"an IPv6 host takes brackets, as in [::1]:{port}; got {value!r}")
    return host, int(port)


def join_hostport(host: str, port: int) -> str:
    """The inverse of :func:`split_hostport`: IPv6 literals get their brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, without brackets) can only mean this
    machine: ``localhost``, 127.0.0.0/8, ``::1`` (with or without a zone) and
    IPv4-mapped loopback (``::ffff:127.0.0.1``). Anything else is not, ``0.0.0.0``, ``::``
    and ``""`` (every interface) above all, and so is any other name: what it resolves
    to is not known here."""
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
