"""Images named by URL in API requests: data: URIs pass through; local files only under
--allowed-local-media-path; http(s) only with --allow-remote-media, fetched with a time and a size limit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import FieldError


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None
    allow_remote: bool = False
    timeout_s: float = 10.0
    max_bytes: int = 32 * 2**20


async def resolve_media(messages: list[dict], policy: MediaPolicy) -> list[dict]:
    """image_url and video_url parts -> image and video parts whose source the processor may read."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image_url", "video_url"):
                    url = part.get(kind)
                    url = url.get("url") if isinstance(url, dict) else url
                    source = await resolve_url(url, policy, f"messages[{i}].content[{j}].{kind}")
                    media = kind.removesuffix("_url")
                    parts.append({"type": media, media: source})
                else:
                    parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    return out


async def resolve_url(url: str, policy: MediaPolicy, where: str):
    """-> what the processor takes (a data: URI, a local path, or the fetched bytes)."""
    if not isinstance(url, str) or not url:
        raise FieldError("", where, url, "expected an image URL")
    if url.startswith("data:"):
        return url
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        if not policy.allow_remote:
            raise FieldError("", where, url[:100], "remote images are off (start the server with "
                             "--allow-remote-media)")
        return await _fetch(url, policy, where)
    if parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path if parsed.scheme == "file" else url)).expanduser()
        root = policy.allowed_local_path
        if root is None:
            raise FieldError("", where, url[:100], "local files are off (start the server with "
                             "--allowed-local-media-path DIR)")
        real = path.resolve()
        if not real.is_relative_to(root.resolve()):
            raise FieldError("", where, url[:100], f"outside the allowed local media path {root}")
        return str(real)
    raise FieldError("", where, url[:100], f"unsupported URL scheme {parsed.scheme!r}")


async def _fetch(url: str, policy: MediaPolicy, where: str) -> bytes:
    import httpx

    data = bytearray()
    try:
        async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise FieldError("", where, url[:100], f"fetching it answered HTTP {response.status_code}")
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise FieldError("", where, url[:100], f"larger than {policy.max_bytes // 2**20} MiB")
    except httpx.HTTPError as e:
        raise FieldError("", where, url[:100], f"cannot fetch it ({type(e).__name__})") from None
    return bytes(data)
