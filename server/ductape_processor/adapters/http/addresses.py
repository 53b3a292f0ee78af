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


def address_problem(host: str) -> str | None:
    """Why `host` (an IP address, possibly in brackets) is not a public address, or None (a name: not checked)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if not address.is_global or address.is_multicast:
        return f"{address} is a private, loopback or otherwise non-public address"
    return None


async def public_addresses(host: str, port: int) -> list[str]:
    """The public addresses of `host` (a name or an IP literal), to connect to; a host with none fails to connect
    (OSError), naming why."""
    found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    kept = list(dict.fromkeys(str(entry[4][0]) for entry in found if address_problem(str(entry[4][0])) is None))
    if not kept:
        raise OSError(f"{host} resolves only to private, loopback or non-public addresses")
    return kept
