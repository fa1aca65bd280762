"""Where a checkpoint source lives: an existing directory, or a Hugging Face hub id resolved to a
local snapshot holding config.json and model.safetensors only (the local cache first, then,
unless HF_HUB_OFFLINE is set, a download of just those two files)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Tuple

from theia_ros.encoder.config import HUB_ORGANISATION, VARIANTS
from theia_ros.weights import CheckpointError


def resolve_source(source: str, revision: Optional[str], cache_dir) -> Tuple[Path, str]:
    """-> (directory holding config.json + model.safetensors, model_id)."""
    path = Path(os.path.expanduser(str(source)))
    if path.exists():
        if path.is_file():
            if path.name in ("model.safetensors", "config.json"):
                path = path.parent
            else:
                raise CheckpointError(f"{path} is a file; pass the checkpoint directory "
                                      "(holding config.json and model.safetensors)")
        return path, str(path.resolve())
    text = str(source)
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") != 1 or text.endswith(".safetensors")
    if looks_like_path or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        raise CheckpointError(
            f"checkpoint {text!r} not found: not an existing directory, a hub id like "
            f"'{HUB_ORGANISATION}/{VARIANTS[1]}', or 'random:<variant>'")
    return hub_snapshot(text, revision, cache_dir), text


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: use the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir(cache_dir):
    """The Hugging Face cache to look in: ``cache_dir``, else $HF_HUB_CACHE, else $HF_HOME/hub."""
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def hub_snapshot(repo_id: str, revision: Optional[str], cache_dir) -> Path:
    """Resolve a hub id to a local snapshot holding config.json and model.safetensors only:
    the local cache first, then (unless HF_HUB_OFFLINE) a download of just those two files."""
    from huggingface_hub import snapshot_download

    files = ["config.json", "model.safetensors"]
    cache = hub_cache_dir(cache_dir)
    how = (f"download it where there is network access, e.g. `hf download {repo_id} config.json "
           f"model.safetensors --local-dir DIR` (older huggingface_hub: `huggingface-cli download ...`), "
           f"and pass DIR as the source, or unset HF_HUB_OFFLINE")

    def complete(folder) -> bool:
        return folder is not None and all((Path(folder) / f).is_file() for f in files)

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=files,
                                   local_files_only=True)
        if complete(folder):
            return Path(folder)
    except Exception:  # broad on purpose: not cached: any of several hub errors
        pass
    if hub_offline():
        raise CheckpointError(f"checkpoint {repo_id!r} is not in the local Hugging Face cache "
                              f"({cache or 'default cache'}) and HF_HUB_OFFLINE is set; {how}")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=files)
    except Exception as exc:  # broad on purpose: the error says how to fetch it
        raise CheckpointError(
            f"could not download checkpoint {repo_id!r} ({type(exc).__name__}: {exc}); {how}") from None
    if not complete(folder):
        raise CheckpointError(f"hub repository {repo_id!r} has no config.json + model.safetensors "
                              f"(only safetensors weights are loaded)")
    return Path(folder)
