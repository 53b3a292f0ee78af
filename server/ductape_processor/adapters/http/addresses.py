"""Where outbound requests may not go on a shared deployment: private, loopback, link-local and other non-public
addresses (RFC 1918, RFC 4193, 127/8, ::1, 169.254/16 and the cloud metadata address, ...).

Both the URL's host (an IP literal, which aiohttp connects to without resolving) and every address a name resolves
to are checked, at the moment of connecting: a name cannot resolve to a public address when checked and to a private
one when used (DNS rebinding), because the connection goes to the addresses this resolver handed out.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


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


class PublicResolver(AbstractResolver):
    """Resolves names like aiohttp's default resolver, keeping only public addresses; a name with none fails to
    connect (OSError), naming why."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The public addresses of `host`."""
        found = await self._inner.resolve(host, port, family)
        kept = [entry for entry in found if address_problem(entry["host"]) is None]
        if not kept:
            raise OSError(f"{host} resolves only to private, loopback or non-public addresses")
        return kept

    async def close(self) -> None:
        """Release the inner resolver."""
        await self._inner.close()
