"""--model resolution: a local checkpoint folder, a built-in config name, 'tiny-random', or a hub id."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .config import builtin_config
from .errors import Glm45vError

TINY_RANDOM = "tiny-random"
_TINY_VERSION = "v2"  # bump when the tiny model changes, so stale caches are not reused
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


def cache_dir() -> Path:
    return Path(os.environ.get("GLM45V_CACHE") or Path.home() / ".cache" / "glm45v-npu")


def tiny_random_path() -> Path:
    """Generated on first use (deterministic), then read from the cache."""
    path = cache_dir() / f"tiny-random-{_TINY_VERSION}"
    if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        return path
    from .tiny_random import write_vl_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tiny-"))
    write_vl_checkpoint(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(name: str | Path) -> tuple[Path, bool]:
    """-> (folder holding config.json, whether it is a built-in config without weights)."""
    name = str(name)
    if name == TINY_RANDOM:
        return tiny_random_path(), False
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Glm45vError(f"--model {name}: not a folder (expected a checkpoint folder with config.json)")
        if not (path / "config.json").is_file():
            raise Glm45vError(f"--model {name}: the folder has no config.json, so it is not a checkpoint")
        return path, False
    builtin = builtin_config(name)
    if builtin is not None:
        return builtin.parent, True
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download(name), False
    raise Glm45vError(f"--model {name}: no such folder, built-in config or hub id")


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated: all end the same way for the user
        raise Glm45vError(
            f"--model {repo}: cannot download from the Hugging Face hub ({type(e).__name__}). If you are offline, "
            "download the checkpoint elsewhere and pass its local folder, e.g. --model /data/GLM-4.5V"
        ) from None
