"""The outbound policy: which hosts the service may call on a client's behalf (MCP servers).

A URL's host is checked when a request is validated (`host_allowed`), and again when a
connection is made: the name is resolved, every address it resolves to is checked
(`address_allowed`), and the connection goes to a checked address, so a name that resolves to a
public address at validation and to 127.0.0.1 a second later (DNS rebinding) is refused. The
URL's name still goes in the Host header and the TLS server name.

Refused unless MESSAGING_MCP_ALLOW_PRIVATE is set: loopback, private, link-local, shared
(carrier-grade NAT) and reserved addresses, and names like `localhost`. Cloud metadata
addresses are refused always: no tool server lives there, and their credentials must never be
one request away. When MESSAGING_MCP_ALLOWED_HOSTS is set, only those hosts (".example.com"
for a domain and its subdomains) are called at all.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import httpcore2
import httpx2
from django.conf import settings

# AWS, GCP and Azure (IPv4 and AWS's IPv6), Alibaba Cloud, Oracle Cloud.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address) for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_LOCAL_NAMES = ("localhost", ".localhost", ".internal", ".local")


def host_allowed(host: str) -> bool:
    """What can be said of a URL's host without resolving it (at validation)."""
    host = host.strip("[]").rstrip(".").lower()
    allowed = settings.MESSAGING_MCP_ALLOWED_HOSTS
    if allowed and not any(host == name or (name.startswith(".") and host.endswith(name)) for name in allowed):
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # A name: its addresses are checked when connecting.
        return settings.MESSAGING_MCP_ALLOW_PRIVATE or not (host == "localhost" or host.endswith(_LOCAL_NAMES))
    return address_allowed(address)


def address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return False
    return settings.MESSAGING_MCP_ALLOW_PRIVATE or address.is_global


class OutboundRefused(httpcore2.ConnectError):
    """A connection the outbound policy refuses (raised where httpx expects a connect error, so
    it surfaces as httpx2.ConnectError with this message)."""


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, each allowed by the policy, or OutboundRefused."""
    if not host_allowed(host):
        raise OutboundRefused(f"{host} is not allowed by the outbound policy")
    try:
        addresses = await lookup(host, port)
    except socket.gaierror as exc:
        raise httpcore2.ConnectError(f"{host} could not be resolved ({exc.strerror})") from None
    for address in addresses:
        if not address_allowed(ipaddress.ip_address(address)):
            raise OutboundRefused(f"{host} resolves to {address}, which the outbound policy refuses")
    return addresses


async def lookup(host: str, port: int) -> list[str]:
    """The addresses DNS gives for `host` (the system's resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _PolicyBackend(httpcore2.AsyncNetworkBackend):
    """Connects only to addresses the policy allows, resolving the name itself."""

    def __init__(self) -> None:
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        failure: Exception | None = None
        for address in await resolve(host, port):
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None) -> httpcore2.AsyncNetworkStream:
        raise OutboundRefused("Unix sockets are not allowed by the outbound policy")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class ResponseTooLarge(httpx2.ReadError):
    """A response body went past the client's byte limit."""


class _Limited(httpx2.AsyncByteStream):
    def __init__(self, stream: httpx2.AsyncByteStream, limit: int, on_too_large: Callable[[], None] | None):
        self._stream = stream
        self._limit = limit
        self._on_too_large = on_too_large

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for part in self._stream:
            seen += len(part)
            if seen > self._limit:
                if self._on_too_large is not None:
                    self._on_too_large()  # the caller may see only a generic failure
                raise ResponseTooLarge(f"the response was larger than {self._limit} bytes")
            yield part

    async def aclose(self) -> None:
        await self._stream.aclose()


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle takes 20-35 ms: once per process, not per connection's client.
    return httpx2.create_ssl_context()


class _PolicyTransport(httpx2.AsyncHTTPTransport):
    def __init__(self, max_response_bytes: int, on_too_large: Callable[[], None] | None):
        # No proxies from the environment: a proxy would make the connection, not us.
        super().__init__(verify=_ssl_context(), trust_env=False)
        # httpx2 takes no network backend; the pool under it (httpcore2) does.
        self._pool = httpcore2.AsyncConnectionPool(ssl_context=self._pool._ssl_context, network_backend=_PolicyBackend())
        self._max_response_bytes = max_response_bytes
        self._on_too_large = on_too_large

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        response.stream = _Limited(response.stream, self._max_response_bytes, self._on_too_large)
        return response


def http_client(
    *,
    headers: dict[str, str] | None,
    timeout: float,
    read_timeout: float,
    max_response_bytes: int,
    on_response: Callable[[httpx2.Response], Awaitable[None]] | None = None,
    on_too_large: Callable[[], None] | None = None,
) -> httpx2.AsyncClient:
    """An HTTP client for calls made on a client's behalf: the policy checked on every
    connection (redirects included), and no response body larger than `max_response_bytes`."""
    return httpx2.AsyncClient(
        headers=headers,
        timeout=httpx2.Timeout(timeout, read=read_timeout),
        transport=_PolicyTransport(max_response_bytes, on_too_large),
        event_hooks={"response": [on_response] if on_response else []},
        follow_redirects=False,
        trust_env=False,
    )
