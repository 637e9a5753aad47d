"""Messages -> token ids through the checkpoint's chat template, with the text of the messages kept as text.

A message whose text holds a control token's spelling (`<|assistant|>`, `<|image|>`, `<think>`, ...) must not
become that token: a user could forge a turn or an image placeholder. Such spellings in the messages (and in the
template's keyword values) are wrapped in private-use markers before rendering; after it, the marked pieces are
encoded as plain text and the rest, the template's own control tokens included, as usual (the way OpenAI's API
and transformers' newer `sanitize_control_tokens` treat message text). Messages without such spellings render
exactly as before. Only read-only tokenizer calls are made, so worker threads may encode concurrently.
"""

from __future__ import annotations

import re
from typing import Any

OPEN, CLOSE = "\U000ffff0", "\U000ffff1"  # private-use code points; any in the input are dropped first


def render(tokenizer, control: re.Pattern, messages: list, **kwargs: Any) -> tuple[list[int], str]:
    """-> (token ids, the rendered prompt as text); `control` from control_pattern(tokenizer)."""
    marked = _mark(messages, control)
    marked_kwargs = _mark(kwargs, control)
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True, **marked_kwargs)
    if OPEN not in text and CLOSE not in text:
        return tokenizer.encode(text, add_special_tokens=False), text
    ids, plain = [], []
    pieces = re.split(f"{OPEN}(.*?){CLOSE}|[{OPEN}{CLOSE}]", text)
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        if i % 2:  # a marked spelling: its characters, never the token
            ids += encode_as_text(tokenizer, piece)
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False)
        plain.append(piece)
    return ids, "".join(plain)


def control_pattern(tokenizer) -> re.Pattern:
    """Every added token's spelling (special or not: the template may write any of them)."""
    tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)  # longest first: a token before its parts
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


def _mark(obj: Any, control: re.Pattern) -> Any:
    if isinstance(obj, str):
        obj = obj.replace(OPEN, "").replace(CLOSE, "")
        return control.sub(lambda m: f"{OPEN}{m.group(0)}{CLOSE}", obj)
    if isinstance(obj, dict):
        return {k: _mark(v, control) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, control) for v in obj]
    return obj


def encode_as_text(tokenizer, text: str) -> list[int]:
    """`text` through the tokenizer's normalizer, pre-tokenizer and model only, so its added tokens never match
    (the fast tokenizer's parts are read, never reconfigured)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__}: a fast (tokenizers) tokenizer is needed to encode text "
                        "that spells a control token")
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
    return [t.id for split in splits for t in backend.model.tokenize(split)]
