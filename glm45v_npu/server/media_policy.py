"""What a client may make the server open, for every media part of a chat request, in one place.

The API takes OpenAI's content parts only: `text`, `image_url` and `video_url` (a URL string or {"url": ...});
anything else is a 400 naming the part. Each URL becomes bytes here, before the engine sees the request, so the
processor never opens a path or a socket for a client:
- data: URIs pass through (the processor decodes them);
- local files only under --allowed-local-media-path, regular files only (never a FIFO or a device), read with a
  size limit; a path outside the folder is refused whether or not it exists;
- http(s) only with --allow-remote-media: the host is resolved here and every address it resolves to must be
  public (no loopback, private, link-local, multicast or reserved ranges) unless --allow-private-media-hosts says
  otherwise; the connection goes to the checked address, redirects are followed by hand and each hop is checked
  again; one deadline covers the whole fetch; every failure reads the same to the client (no port scanning).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from ..errors import FieldError

log = logging.getLogger("glm45v_npu")
MEDIA_PARTS = {"image_url": "image", "video_url": "video"}
FETCH_FAILED = "could not be fetched (remote media must be a public http(s) URL that answers 200 within the limits)"


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None
    allow_remote: bool = False
    allow_private_hosts: bool = False  # remote media may resolve to loopback, private or link-local addresses
    timeout_s: float = 10.0  # the whole fetch of one URL, redirects included
    max_bytes: int = 32 * 2**20  # one image or video
    max_request_bytes: int = 64 * 2**20  # all media of one request
    max_redirects: int = 3

    def address_allowed(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return self.allow_private_hosts or (ip.is_global and not ip.is_multicast)


async def resolve_media(messages: list, policy: MediaPolicy) -> list[dict]:
    """OpenAI messages -> the same messages with every media part as {"type": "image"|"video", kind: bytes or a
    data: URI}; anything the policy refuses is a FieldError naming the part."""
    out, budget = [], [policy.max_request_bytes]
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FieldError("", f"messages[{i}]", type(m).__name__, "expected an object with 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": [await _part(part, f"messages[{i}].content[{j}]", policy, budget)
                                  for j, part in enumerate(content)]}
        elif content is not None and not isinstance(content, str):
            raise FieldError("", f"messages[{i}].content", type(content).__name__,
                             "expected a string or a list of content parts")
        out.append(m)
    return out


async def _part(part, where: str, policy: MediaPolicy, budget: list[int]) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return part
    if kind not in MEDIA_PARTS:
        raise FieldError("", f"{where}.type", kind, "expected text, image_url or video_url")
    url = part.get(kind)
    url = url.get("url") if isinstance(url, dict) else url
    source = await resolve_url(url, policy, f"{where}.{kind}")
    budget[0] -= len(source)
    if budget[0] < 0:
        raise FieldError("", where, kind, f"the request's media are over {policy.max_request_bytes // 2**20} MiB "
                                          "in all")
    media = MEDIA_PARTS[kind]
    return {"type": media, media: source}


async def resolve_url(url, policy: MediaPolicy, where: str) -> str | bytes:
    """-> a data: URI (as given) or the media's bytes."""
    if not isinstance(url, str) or not url:
        raise FieldError("", where, url, "expected a media URL")
    if "\x00" in url:
        raise FieldError("", where, url[:100], "a URL cannot hold a NUL byte")
    if url.startswith("data:"):
        if len(url) > policy.max_bytes * 4 // 3 + 256:
            raise FieldError("", where, url[:100], f"larger than {policy.max_bytes // 2**20} MiB")
        return url
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if not policy.allow_remote:
            raise FieldError("", where, url[:100], "remote media are off (start the server with --allow-remote-media)")
        return await fetch(url, policy, where)
    if parsed.scheme in ("", "file"):
        if policy.allowed_local_path is None:
            raise FieldError("", where, url[:100], "local files are off (start the server with "
                             "--allowed-local-media-path DIR)")
        path = Path(unquote(parsed.path if parsed.scheme == "file" else url)).expanduser()
        return await asyncio.to_thread(read_local, path, policy, where, url)
    raise FieldError("", where, url[:100], f"unsupported URL scheme {parsed.scheme!r}")


def read_local(path: Path, policy: MediaPolicy, where: str, url: str) -> bytes:
    """A regular file under the allowed folder, read whole (up to the size limit); opened without blocking, so a
    FIFO or a device never stalls the server."""
    root = policy.allowed_local_path.resolve()
    real = path.resolve()
    if not real.is_relative_to(root):
        raise FieldError("", where, url[:100], f"outside the allowed local media path {policy.allowed_local_path}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise FieldError("", where, url[:100], "no readable file there") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FieldError("", where, url[:100], "not a regular file")
        if info.st_size > policy.max_bytes:
            raise FieldError("", where, url[:100], f"larger than {policy.max_bytes // 2**20} MiB")
        chunks, left = [], policy.max_bytes
        while left > 0 and (chunk := os.read(fd, min(left, 2**20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


async def fetch(url: str, policy: MediaPolicy, where: str) -> bytes:
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(url, policy)
    except FieldError:
        raise
    except Exception as e:  # refused address, DNS, connection, TLS, HTTP status, size, deadline: all read the same
        log.info("remote media %s: %s: %s", url[:200], type(e).__name__, e)
        raise FieldError("", where, url[:100], FETCH_FAILED) from None


class _Refused(Exception):
    """The URL, or one of its redirects, leads somewhere the policy does not allow."""


async def _fetch(url: str, policy: MediaPolicy) -> bytes:
    import httpx

    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            target, headers, extensions = await _pinned(url, policy)
            async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise _Refused(f"HTTP {response.status_code}")
                if int(response.headers.get("content-length") or 0) > policy.max_bytes:
                    raise _Refused("too large (Content-Length)")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise _Refused("too large")
                return bytes(data)
    raise _Refused("too many redirects")


async def _pinned(url: str, policy: MediaPolicy) -> tuple[str, dict, dict]:
    """The URL with its host replaced by an address that the policy allows (resolved once, here), and the Host
    header and TLS server name that keep the request addressed to the original host."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _Refused(f"not an http(s) URL: {url[:100]}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(parsed.hostname, port, type=0)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses or not all(policy.address_allowed(a) for a in addresses):
        raise _Refused(f"{parsed.hostname} resolves to {addresses}, not all allowed")
    address = addresses[0]
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{port}"
    target = parsed._replace(netloc=netloc).geturl()
    headers = {"Host": parsed.netloc.rpartition("@")[2]}
    return target, headers, {"sni_hostname": parsed.hostname} if parsed.scheme == "https" else {}
