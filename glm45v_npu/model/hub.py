"""--model resolution: a local checkpoint folder, a built-in config name, 'tiny-random', or a hub id."""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

from ..errors import Glm45vError
from ..platform import cache_dir
from .hf_config import builtin_config

TINY_RANDOM = "tiny-random"
_TINY_VERSION = "v4"  # bump when the tiny model changes, so stale caches are not reused
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


def tiny_random_path() -> Path:
    """Generated on first use (deterministic), then read from the cache."""
    path = cache_dir() / f"tiny-random-{_TINY_VERSION}"
    if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        return path
    from ..testing.tiny_random import write_vl_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tiny-"))
    write_vl_checkpoint(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_model(name: str | Path, revision: str | None = None, download_dir: str | None = None,
                  config_only: bool = False) -> tuple[Path, bool]:
    """-> (folder holding config.json, whether it is a built-in config without weights). A hub id is downloaded
    through huggingface_hub's cache (only its config files when config_only)."""
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
        return _download(name, revision, download_dir, _CONFIG_FILES if config_only else _HUB_FILES), False
    raise Glm45vError(f"--model {name}: no such folder, built-in config or hub id")


_CONFIG_FILES = ["config.json", "generation_config.json", "preprocessor_config.json"]


def _download(repo: str, revision: str | None, cache: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=patterns))
    except Exception as e:
        raise Glm45vError(f"--model {repo}: {download_failure(e, repo, revision)}") from None


def download_failure(e: Exception, repo: str, revision: str | None) -> str:
    """Say which of the usual failures it was: offline, gated, not found, revision, authentication, disk."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        return (f"the repository is gated: accept its terms on https://huggingface.co/{repo} and log in "
                "(`hf auth login` or HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return f"revision {revision!r} does not exist in the repository"
    if isinstance(e, RepositoryNotFoundError):
        return ("no such repository on the Hugging Face hub (or it is private: log in with `hf auth login` or "
                "HF_TOKEN)")
    if isinstance(e, HfHubHTTPError) and status in (401, 403):
        return f"the hub refused the request (HTTP {status}): log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full while downloading ({e.filename or 'hub cache'}); free space or pass --download-dir"
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)) or \
            "connect" in type(e).__name__.lower():
        return ("cannot reach the Hugging Face hub (offline?). Download the checkpoint elsewhere and pass its "
                "local folder, e.g. --model /data/GLM-4.5V")
    if isinstance(e, HfHubHTTPError):
        return f"the hub answered HTTP {status} ({e})"
    return f"the download failed ({type(e).__name__}: {e})"
