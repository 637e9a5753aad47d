"""Request shapes: the keys a request may have, its media given beside the prompt, and OpenAI-style messages split
into what the chat template renders and the media it names. Every mistake names the field, message or part."""

from __future__ import annotations

import json
from typing import Any

from ..errors import Glm45vError

REQUEST_KEYS = {"prompt", "prompt_token_ids", "messages", "images", "videos", "multi_modal_data",
                "chat_template_kwargs", "tools"}
ROLES = ("system", "user", "assistant", "observation", "tool")


def request_media(request: dict) -> tuple[list, list]:
    """(images, videos) given as 'images' / 'videos' or as vLLM's multi_modal_data."""
    images, videos = request.get("images"), request.get("videos")
    mm = request.get("multi_modal_data")
    if mm is not None:
        if images is not None or videos is not None:
            raise Glm45vError("request: pass media either as 'images'/'videos' or as 'multi_modal_data', not both")
        if not isinstance(mm, dict):
            raise Glm45vError("request: 'multi_modal_data' must be a dict such as {'image': [...]}")
        unknown = sorted(set(mm) - {"image", "video"})
        if unknown:
            raise Glm45vError(f"request: multi_modal_data kind(s) {', '.join(map(repr, unknown))} are not "
                              "supported (only 'image' and 'video')")
        images, videos = mm.get("image"), mm.get("video")

    def listed(x) -> list:
        return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]

    return listed(images), listed(videos)


def text_bytes(request: Any) -> tuple[int, str]:
    """The UTF-8 bytes of a request's text (prompt, message text, reasoning, tool calls and tools; not its media),
    and the field that holds most of it: counted before anything is tokenized, to refuse what cannot fit."""
    if isinstance(request, str):
        return len(request.encode("utf-8", "replace")), "prompt"
    if not isinstance(request, dict):
        return 0, "request"
    if isinstance(request.get("prompt"), str):
        return len(request["prompt"].encode("utf-8", "replace")), "prompt"
    tools = request.get("tools")
    tool_bytes = len(json.dumps(tools, default=str).encode()) if tools else 0
    total = tool_bytes
    for m in request.get("messages") or []:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text") for p in content or []
                                                             if isinstance(p, dict)] if isinstance(content, list) else []
        for text in [*parts, m.get("reasoning_content")]:
            if isinstance(text, str):
                total += len(text.encode("utf-8", "replace"))
        if m.get("tool_calls") is not None:
            total += len(json.dumps(m["tool_calls"], default=str).encode())
    return total, "tools" if 2 * tool_bytes > total else "messages"


def split_media(messages: Any) -> tuple[list, list, list]:
    """OpenAI-style messages -> messages with bare media parts (for the template), the images and the videos."""
    if not isinstance(messages, list) or not messages:
        raise Glm45vError("messages: expected a non-empty list of {'role', 'content'} objects")
    images, videos, out = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Glm45vError(f"messages[{i}]: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # newer OpenAI clients' name for the system turn
            role, m = "system", {**m, "role": "system"}
        if role not in ROLES:
            raise Glm45vError(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)} (or developer)")
        if role == "assistant" and m.get("tool_calls") is not None:
            m = {**m, "tool_calls": _tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")}
        if role == "tool" and isinstance(content, list):  # the template renders a tool result as text
            content = _text_only(content, f"messages[{i}].content")
        if content is None or isinstance(content, str):
            out.append({**m, "content": content or ""})
            continue
        if not isinstance(content, list):
            raise Glm45vError(f"messages[{i}].content: expected a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise Glm45vError(f"{where}: expected an object with a 'type'")
            kind = part.get("type")
            media = kind[:-4] if kind in ("image_url", "video_url") else kind
            if media in ("image", "video"):
                src = part.get(media) or part.get("path") or part.get("url") or part.get(f"{media}_url")
                if isinstance(src, dict):
                    src = src.get("url")
                if src is None:
                    raise Glm45vError(f"{where}: {media} part without {'an' if media == 'image' else 'a'} {media}")
                (images if media == "image" else videos).append(src)
                parts.append({"type": media})
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    raise Glm45vError(f"{where}.text: expected a string")
                parts.append(part)
            else:
                raise Glm45vError(f"{where}.type: {kind!r} is not supported (text, image, image_url, video or "
                                  "video_url)")
        out.append({**m, "content": parts})
    return out, images, videos


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """OpenAI tool calls in a history -> what the chat template renders: arguments as an object (OpenAI clients
    send them as JSON text)."""
    if not isinstance(calls, list):
        raise Glm45vError(f"{where}: expected a list of {{'id', 'type', 'function'}} objects")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Glm45vError(f"{where}[{j}].function: expected {{'name', 'arguments'}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise Glm45vError(f"{where}[{j}].function.arguments: not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise Glm45vError(f"{where}[{j}].function.arguments: expected a JSON object")
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def _text_only(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise Glm45vError(f"{where}[{j}]: a tool result holds text parts only")
        texts.append(part["text"])
    return "".join(texts)
