"""Where outbound requests may not go on a shared deployment: private, loopback, link-local and other non-public
addresses (RFC 1918, RFC 4193, 127/8, ::1, 169.254/16 and the cloud metadata address, ...).

Both the URL's host (an IP literal) and every address a name resolves to are checked, at the moment of connecting:
a name cannot resolve to a public address when checked and to a private one when used (DNS rebinding), because the
connection goes to the addresses `public_addresses` handed out.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Final


def address_problem(host: str) -> str | None:
    """Why `host` (an IP address, possibly in brackets) is not a public address, or None (a name: not checked)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        address = _embedded_ipv4(address) or address
    if not address.is_global or address.is_multicast:
        return f"{address} is a private, loopback or otherwise non-public address"
    return None


_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix (RFC 6052): a translator forwards `64:ff9b::a.b.c.d` to the IPv4 address a.b.c.d."""
_IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
"""Deprecated IPv4-compatible addresses (`::a.b.c.d`, RFC 4291): some stacks still route them to a.b.c.d."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches through a mapping, a translator or a tunnel (IPv4-mapped, NAT64,
    IPv4-compatible, 6to4, Teredo), or None: Python's `is_global` judges some of these forms global whatever the
    IPv4 address inside is."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    return address.teredo[1] if address.teredo is not None else None


async def public_addresses(host: str, port: int) -> list[str]:
    """The public addresses of `host` (a name or an IP literal), to connect to; a host with none fails to connect
    (OSError), naming why."""
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    kept = list(dict.fromkeys(str(entry[4][0]) for entry in found if address_problem(str(entry[4][0])) is None))
    if not kept:
        raise OSError(f"{host} resolves only to private, loopback or non-public addresses")
    return kept
