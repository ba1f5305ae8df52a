"""Who may associate: an allow-list of calling AE titles, each optionally pinned to a peer address.

``--allow-ae CONSOLE1`` admits the calling AE title CONSOLE1 from any address;
``--allow-ae CONSOLE1@10.0.0.7`` only from that IP address (or host name, resolved once at start).
AE titles are compared exactly after stripping the padding spaces (PS3.8 9.3.2: case matters).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass


class AccessError(ValueError):
    """A malformed allow-list entry."""


@dataclass(frozen=True)
class AllowedPeer:
    ae_title: str
    addresses: frozenset[str] | None  # None: any address

    def admits(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        return self.addresses is None or _normalise(address) in self.addresses


def _normalise(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def valid_ae_title(title: str) -> str:
    """``title`` stripped, or :class:`AccessError` if it is not a valid AE title (1–16 printable, no backslash)."""
    t = str(title).strip()
    if not 1 <= len(t) <= 16 or any(ord(c) < 32 or ord(c) > 126 or c == "\\" for c in t):
        raise AccessError(f"invalid AE title {title!r}: 1 to 16 printable ASCII characters, no backslash")
    return t


def parse_allowed(entry: str) -> AllowedPeer:
    """``AET`` or ``AET@HOST`` → :class:`AllowedPeer` (HOST resolved to its addresses now)."""
    title, sep, host = str(entry).partition("@")
    title = valid_ae_title(title)
    if not sep:
        return AllowedPeer(title, None)
    if not host:
        raise AccessError(f"--allow-ae {entry!r}: empty host after '@'")
    try:
        addresses = {_normalise(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise AccessError(f"--allow-ae {entry!r}: cannot resolve {host!r}: {exc}") from None
    return AllowedPeer(title, frozenset(addresses))


class AllowList:
    """The parsed allow-list; empty and ``allow_any`` means every calling AE title is admitted."""

    def __init__(self, entries, *, allow_any: bool = False):
        self.peers = [parse_allowed(e) for e in entries or ()]
        self.allow_any = bool(allow_any)
        if not self.peers and not self.allow_any:
            raise AccessError(
                "no calling AE title is allowed: give --allow-ae AET (the console's AE title, "
                "repeatable; AET@HOST pins an address) or --allow-any-ae to admit everyone"
            )

    def admits(self, ae_title: str, address: str) -> bool:
        return self.allow_any or any(p.admits(ae_title, address) for p in self.peers)

    def describe(self) -> str:
        if self.allow_any:
            return "any calling AE title"
        return ", ".join(
            p.ae_title + ("" if p.addresses is None else "@" + "|".join(sorted(p.addresses))) for p in self.peers
        )
