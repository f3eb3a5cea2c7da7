"""Parsing of ``host:port`` network addresses (IPv4, ``[IPv6]:port``, names)."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, any_port: bool = False) -> Address:
    """Parse ``host:port`` or ``[v6]:port``; raise ValueError with a clear message.

    ``any_port`` admits port 0 (a listening address that lets the OS choose).
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"bad address {text!r}: expected HOST:PORT")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT")
        if ":" in host:
            raise ValueError(f"bad address {text!r}: write IPv6 addresses as [ADDR]:PORT")
        if not all(part.isalnum() or part == "" for part in host.replace("-", ".").split(".")):
            raise ValueError(f"bad address {text!r}: {host!r} is not a host name")
    port_min = 0 if any_port else 1
    if not port_text.isdigit() or not port_min <= int(port_text) < 65536:
        raise ValueError(f"bad address {text!r}: port must be {port_min}..65535")
    return Address(host, int(port_text))
