"""Network guard: which addresses a crawl or a download may connect to.

By default nothing goes to loopback, private, link-local (169.254.169.254, the cloud metadata
service, included), CGNAT, multicast, reserved or otherwise non-global addresses; `allow_networks`
(CIDRs) opens exceptions. Every address a name resolves to must pass, and the caller connects to
the address that was checked (`NetworkGuard.connect`), never to the name again: a second lookup
could answer differently (DNS rebinding). Redirects are new requests and are checked the same way.

Hosts are parsed the way the C resolver would read them, so `2130706433`, `0x7f000001`,
`0177.0.0.1`, `127.1`, `[::ffff:127.0.0.1]` all count as 127.0.0.1. Decisions are pure functions
of the resolved addresses; only `check_host` with the default resolver touches DNS.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union
from urllib.parse import unquote, urlsplit

from cnclip.corpus.net.reasons import BAD_URL, BLOCKED_ADDRESS, CONNECT_FAILED, DNS_FAILED, UNSUPPORTED_SCHEME

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Resolver = Callable[[str, int], Sequence[str]]

_N = ipaddress.ip_network
# (network, category), most specific first. Python's is_private/is_global flags changed between
# releases (multicast counts as "global" in 3.11), so the list is explicit and the flags are only
# a last catch-all.
_BLOCKED: tuple[tuple[IPNetwork, str], ...] = (
    (_N("0.0.0.0/8"), "unspecified"),
    (_N("10.0.0.0/8"), "private"),
    (_N("100.64.0.0/10"), "shared_cgnat"),
    (_N("127.0.0.0/8"), "loopback"),
    (_N("169.254.0.0/16"), "link_local"),
    (_N("172.16.0.0/12"), "private"),
    (_N("192.0.0.0/24"), "reserved"),
    (_N("192.0.2.0/24"), "documentation"),
    (_N("192.88.99.0/24"), "reserved"),
    (_N("192.168.0.0/16"), "private"),
    (_N("198.18.0.0/15"), "benchmarking"),
    (_N("198.51.100.0/24"), "documentation"),
    (_N("203.0.113.0/24"), "documentation"),
    (_N("224.0.0.0/4"), "multicast"),
    (_N("240.0.0.0/4"), "reserved"),
    (_N("::/128"), "unspecified"),
    (_N("::1/128"), "loopback"),
    (_N("::/96"), "reserved"),  # deprecated IPv4-compatible addresses
    (_N("64:ff9b:1::/48"), "private"),  # local-use NAT64
    (_N("100::/64"), "reserved"),  # discard-only
    (_N("2001::/23"), "reserved"),  # IETF protocol assignments, Teredo included
    (_N("2001:db8::/32"), "documentation"),
    (_N("fc00::/7"), "private"),  # unique local
    (_N("fe80::/10"), "link_local"),
    (_N("fec0::/10"), "link_local"),  # deprecated site-local
    (_N("ff00::/8"), "multicast"),
)
_MAPPED = _N("::ffff:0:0/96")
_NAT64 = _N("64:ff9b::/96")
_SIXTOFOUR = _N("2002::/16")
_V4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings -> networks; a bad one raises ValueError naming it."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"allow_networks: {cidr!r} is not a CIDR network (e.g. 127.0.0.0/8, ::1/128)") from None
    return tuple(networks)


def _parse_legacy_ipv4(host: str) -> Optional[ipaddress.IPv4Address]:
    """inet_aton's forms: 1-4 dot-separated parts, each decimal, 0x-hex or 0-octal; the last
    part fills the remaining bytes (`127.1`, `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.match(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part[0] == "0":
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


def parse_ip_literal(host: str) -> Optional[IPAddress]:
    """The address a host string names literally, or None when it is a name to resolve."""
    host = unquote(host.strip())
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]  # a trailing dot (FQDN form) does not stop "127.0.0.1." being loopback
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    return _parse_legacy_ipv4(host)


def embedded_ipv4(address: IPAddress) -> Optional[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, NAT64, 6to4), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address in _MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIXTOFOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def address_category(address: IPAddress) -> Optional[str]:
    """Why an address is blocked by default (`loopback`, `private`…), or None for a global one."""
    inner = embedded_ipv4(address)
    if inner is not None:
        category = address_category(inner)
        return f"{category} (embedded in {address})" if category else None
    for network, category in _BLOCKED:
        if address.version == network.version and address in network:
            return category
    if not address.is_global:
        return "non_global"
    return None


@dataclass(frozen=True)
class Decision:
    """The guard's verdict on one host: allowed, or blocked with a reason code and one line why."""

    allowed: bool
    host: str
    port: int
    addresses: tuple[str, ...] = ()  # every resolved address, in resolver order
    reason: Optional[str] = None  # a `network:*` code when not allowed
    address: Optional[str] = None  # the offending address when blocked
    detail: str = ""

    @property
    def marker(self) -> str:
        """`network:blocked_address 127.0.0.2`: the stable text the download stage maps back."""
        return f"{self.reason} {self.address or self.host}"


def _default_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(sockaddr[0])
    return seen


@dataclass
class NetworkGuard:
    """Checks hosts and URLs against the address policy, and connects only to checked addresses."""

    allow_networks: Sequence[str] = ()
    resolver: Resolver = field(default=_default_resolver, repr=False)
    schemes: tuple[str, ...] = ("http", "https")

    def __post_init__(self) -> None:
        self._allowed = parse_networks(self.allow_networks)

    def check_address(self, address: IPAddress) -> Optional[str]:
        """None when the address may be contacted, else its blocked category."""
        candidates = [address]
        inner = embedded_ipv4(address)
        if isinstance(address, ipaddress.IPv6Address) and address in _MAPPED and inner is not None:
            candidates.append(inner)  # the OS connects a mapped address over IPv4
        if any(c in net for c in candidates for net in self._allowed if c.version == net.version):
            return None
        return address_category(address)

    def check_host(self, host: str, port: int) -> Decision:
        """Resolve (unless literal) and check every address; blocked if any one is blocked."""
        literal = parse_ip_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                resolved = self.resolver(host, port)
            except (OSError, UnicodeError) as err:
                detail = f"{host}: DNS lookup failed ({getattr(err, 'strerror', None) or err})"
                return Decision(False, host, port, reason=DNS_FAILED, detail=detail)
            try:
                addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolved]
            except ValueError as err:
                return Decision(False, host, port, reason=DNS_FAILED, detail=f"{host}: resolver answered {err}")
            if not addresses:
                return Decision(False, host, port, reason=DNS_FAILED, detail=f"{host}: no address")
        shown = tuple(str(a) for a in addresses)
        for address in addresses:
            category = self.check_address(address)
            if category is not None:
                via = f"{host} resolves to {address}" if literal is None else f"{host} is {address}"
                detail = f"{via} ({category}), outside allow_networks"
                return Decision(False, host, port, shown, BLOCKED_ADDRESS, str(address), detail)
        return Decision(True, host, port, shown)

    def check_url(self, url: str) -> Decision:
        """Parse a URL and check its host; bad URLs and other schemes are refused too."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as err:
            return Decision(False, "", 0, reason=BAD_URL, detail=f"{url[:200]}: {err}")
        scheme = parts.scheme.lower()
        if scheme not in self.schemes:
            return Decision(False, host or "", 0, reason=UNSUPPORTED_SCHEME,
                            detail=f"{url[:200]}: scheme {scheme or '(none)'!r} is not fetched")
        if not host:
            return Decision(False, "", 0, reason=BAD_URL, detail=f"{url[:200]}: no host")
        return self.check_host(host, port or (443 if scheme == "https" else 80))

    def connect(self, decision: Decision, timeout: Optional[float]) -> socket.socket:
        """A TCP connection to one of the addresses the decision checked (first that answers),
        all attempts together within `timeout`."""
        if not decision.allowed:
            raise PermissionError(f"cnclip-guard: {decision.marker}: {decision.detail}")
        last: Optional[OSError] = None
        deadline = None if timeout is None else time.monotonic() + timeout
        for address in decision.addresses:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                last = TimeoutError("timed out")
                break
            try:
                return socket.create_connection((address, decision.port), timeout=remaining)
            except OSError as err:
                last = err
        raise ConnectionError(f"{CONNECT_FAILED}: {decision.host}:{decision.port}: {last}")
