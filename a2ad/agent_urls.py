"""Which agent URLs a workspace registered at run time may point at.

A `PUT /workspaces/{id}` names a URL that a2ad will POST to, fetch cards from
and probe, so it is a request-forgery vector: whoever holds the admin token
(or anyone, on an open loopback endpoint reached through a browser or another
local service) could aim a2ad at the cloud metadata service or at link-local
devices. Agents on one box live on loopback or private addresses, so those
stay allowed; link-local (which holds 169.254.169.254, the metadata address of
most clouds), the other well-known metadata addresses and addresses that are
not unicast are refused unless `auth.allow_link_local_agents` is set. Hostnames
are resolved and every address they resolve to is checked. The config file is
the operator's own word and is not checked.

A name that passed when it was registered is checked again at every lookup
a2ad makes to reach it (`AgentResolver`, the resolver of a2ad's client
session), so it cannot later be pointed at a metadata address (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from .errors import InvalidBody

# Metadata services outside the link-local ranges.
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS, IPv6
    }
)
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal"})
RESOLVE_TIMEOUT = 5.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _refusal(address: Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None  # the usual place for an agent on the same box
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "not a unicast address"
    return None


async def _resolve(host: str, port: int) -> list[Address]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        raise InvalidBody(f"url: cannot resolve {host!r}: {exc}") from None
    return [_address(str(info[4][0])) for info in infos]


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refused_without_lookup(host: str) -> str | None:
    """Why `host` is refused before any lookup: a metadata service's name, or an
    address a2ad refuses. None for an allowed address or a name to resolve."""
    if host in METADATA_HOSTS:
        return "a cloud metadata service"
    address = _literal(host)
    return _refusal(address) if address is not None else None


def refused_literal(url: str) -> str | None:
    """Why a URL is refused by its host alone, or None. Names need no lookup
    here: the resolver checks them at every lookup."""
    return _refused_without_lookup(_host_of(url))


class _NotReachable(ValueError):
    """A URL a2ad does not reach, whatever its host: the message says why."""


def _target(url: str, kind: str, instead: str) -> tuple[str, int]:
    """The host (normalised) and port of an http(s) URL without credentials in it;
    _NotReachable otherwise. `kind` names the URL, `instead` what carries credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # an unmatched "[", a port that is not a number
        raise _NotReachable(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise _NotReachable(f"only http and https {kind} URLs are allowed")
    if parts.username or parts.password:
        raise _NotReachable(f"credentials in the URL are not allowed; use {instead}")
    host = _normal(parts.hostname or "")
    if not host:
        raise _NotReachable("the URL has no host")
    return host, port


async def check_agent_url(url: str, *, allow_link_local: bool) -> None:
    """Raise InvalidBody when a run-time workspace may not use `url`."""
    try:
        host, port = _target(url, "agent", "a token")
    except _NotReachable as exc:
        raise InvalidBody(f"url: {exc}") from None
    if allow_link_local:
        return
    why = _refused_without_lookup(host)
    if why is None and _literal(host) is None:
        # A name: refused when any address it resolves to is.
        why = next(filter(None, map(_refusal, await _resolve(host, port))), None)
    if why:
        raise InvalidBody(
            f"url: {host} is {why}; a2ad refuses it for run-time workspaces"
            " unless auth.allow_link_local_agents = true"
        )


def _normal(host: str) -> str:
    return host.rstrip(".").lower()


def _host_of(url: str) -> str:
    return _normal(urlsplit(url).hostname or "")


class _CheckedResolver(AbstractResolver):
    """A resolver that checks a host name at every lookup, as at registration, and
    drops the addresses `refusal` refuses; a name left with none fails to resolve,
    so what would connect to it cannot, and says why (`unless`: how to allow it).
    Names in `passes` are not checked; with `check` off, none is."""

    def __init__(
        self,
        *,
        passes: Iterable[str],
        refusal: Callable[[Address], str | None],
        unless: str,
        check: bool = True,
        inner: AbstractResolver | None = None,
    ) -> None:
        self._inner = inner if inner is not None else DefaultResolver()
        self._passes = frozenset(passes)
        self._refusal = refusal
        self._unless = unless
        self._check = check

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = _normal(host)
        if not self._check or name in self._passes:
            return await self._inner.resolve(host, port, family)
        literal = _literal(name)
        why = (  # a metadata service's name is not even looked up
            "a cloud metadata service"
            if name in METADATA_HOSTS
            else self._refusal(literal)
            if literal is not None
            else None
        )
        if why is None:
            results = await self._inner.resolve(host, port, family)
            allowed = [r for r in results if self._refusal(_address(r["host"])) is None]
            if allowed:
                return allowed
            refused = self._refusal(_address(results[0]["host"])) if results else "no address"
            why = f"now resolving to {refused}"
        raise OSError(f"{host} is {why}; {self._unless}")

    async def close(self) -> None:
        await self._inner.close()


class AgentResolver(_CheckedResolver):
    """The resolver of a2ad's client session, for agents: link-local and metadata
    addresses are refused at every lookup. Hosts of the config file's workspaces
    pass unchecked, as there; with auth.allow_link_local_agents, every host does."""

    def __init__(
        self,
        *,
        trusted_urls: Iterable[str],
        allow_link_local: bool,
        inner: AbstractResolver | None = None,
    ) -> None:
        super().__init__(
            passes=(_host_of(url) for url in trusted_urls),
            refusal=_refusal,
            unless="a2ad refuses it for agents unless auth.allow_link_local_agents = true",
            check=not allow_link_local,
            inner=inner,
        )


def _address(text: str) -> Address:
    return ipaddress.ip_address(text.split("%")[0])


# -- webhooks ------------------------------------------------------------------
# A push config names a URL a2ad will POST to, given by any caller: stricter than
# an agent's. Loopback and private addresses are refused too (a webhook at a2ad's
# own operator API could retry or delete items), unless push.allowed_hosts names
# the host (a receiver on the same box or network).


SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT


def _webhook_refusal(address: Address) -> str | None:
    why = _refusal(address)
    if why is not None:
        return why
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4 inside IPv6 (mapped, 6to4, Teredo) is judged as that IPv4 address.
        inner = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        for v4 in filter(None, inner):
            why = _webhook_refusal(v4)
            if why is not None:
                return why
    if address.is_loopback:
        return "a loopback address"
    if address.is_private or address in SHARED_ADDRESS_SPACE:
        return "a private address"
    return None


def _webhook_check(url: str, allowed_hosts: Iterable[str]) -> str | tuple[str, int] | None:
    """Why a push config may not use `url` by the URL alone (its scheme, a host that
    is an address or a metadata service's name); None when it passes outright; or
    the (name, port) whose addresses are still to be checked."""
    try:
        host, port = _target(url, "webhook", "token or authentication")
    except _NotReachable as exc:
        return str(exc)
    if host in {_normal(h) for h in allowed_hosts}:
        return None
    if host in METADATA_HOSTS:
        return f"{host} is a cloud metadata service"
    literal = _literal(host)
    if literal is None:
        return host, port
    return _webhook_refused(host, [literal])


def _webhook_refused(host: str, addresses: Iterable[Address]) -> str | None:
    why = next(filter(None, map(_webhook_refusal, addresses)), None)
    return f"{host} is {why}; a2ad refuses it unless push.allowed_hosts lists it" if why else None


def webhook_refused_now(url: str, allowed_hosts: Iterable[str]) -> str | None:
    """Why a push config may not use `url`, by the URL alone. A name passes here: it
    is checked where it is looked up (WebhookResolver; aiohttp looks up no address)."""
    checked = _webhook_check(url, allowed_hosts)
    return checked if isinstance(checked, str) else None


async def webhook_refusal(url: str, allowed_hosts: Iterable[str]) -> str | None:
    """Why a push config may not use `url`, or None: `webhook_refused_now`, and a
    name refused when any address it resolves to is (at registration)."""
    checked = _webhook_check(url, allowed_hosts)
    if not isinstance(checked, tuple):
        return checked
    host, port = checked
    try:
        addresses = await _resolve(host, port)
    except InvalidBody:
        return f"cannot resolve {host}"
    return _webhook_refused(host, addresses)


class WebhookResolver(_CheckedResolver):
    """The resolver of a2ad's webhook session: each lookup drops the addresses a
    webhook may not reach, so a name cannot be pointed at one after it was
    registered (DNS rebinding). Hosts in push.allowed_hosts pass unchecked."""

    def __init__(self, allowed_hosts: Iterable[str], inner: AbstractResolver | None = None):
        super().__init__(
            passes=(_normal(h) for h in allowed_hosts),
            refusal=_webhook_refusal,
            unless="not in push.allowed_hosts",
            inner=inner,
        )
