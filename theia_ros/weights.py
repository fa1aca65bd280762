"""Checkpoint files, plain Python: file hashing, the safetensors header, strict key/shape
comparison, the finiteness check, and the one CheckpointError for Theia checkpoints and policy weights."""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union


def sha256_file(path, chunk_size=8 * 2**20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read, or does not match the Theia layout."""


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def read_safetensors_header(path: Union[str, Path]) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Key -> (dtype, shape) from a .safetensors file's header, without reading the tensors.

    Checks that the header parses and that every tensor's bytes lie inside the file (a truncated
    download fails here).  Raises :class:`CheckpointError` naming the path.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"corrupt or truncated safetensors file {path}: only {size} bytes")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(
                    f"corrupt or truncated safetensors file {path}: header of {header_len} bytes in a {size}-byte file")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"missing weights file {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"weights path {path} is a directory, expected a .safetensors file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as exc:
        raise CheckpointError(f"corrupt safetensors file {path}: unparsable header ({exc})") from None
    data_len = size - 8 - header_len
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            nbytes = _ST_DTYPES[dtype] * math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {path}: bad header entry for {key!r}: {info!r}") from None
        if not (0 <= begin <= end) or end - begin != nbytes:
            raise CheckpointError(f"corrupt safetensors file {path}: bad data offsets for {key!r}")
        if end > data_len:
            raise CheckpointError(
                f"truncated safetensors file {path}: tensor {key!r} ends at byte {end} of {data_len} data bytes")
        out[key] = (dtype, shape)
    return out


def names_listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def shape_mismatches(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]]) -> List[str]:
    """Strict comparison of key -> shape maps: one line each for the missing, unexpected and
    mis-shaped keys (naming them); empty when the maps agree."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k} (checkpoint {'x'.join(map(str, found[k])) or 'scalar'}, "
                 f"expected {'x'.join(map(str, expected[k])) or 'scalar'})"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {names_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {names_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped key(s): {names_listing(misshaped)}")
    return problems


def check_checkpoint_shapes(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]],
                            where: str = "checkpoint") -> None:
    """CheckpointError naming every missing, unexpected or mis-shaped key of a Theia checkpoint."""
    problems = shape_mismatches(expected, found)
    if problems:
        raise CheckpointError(f"{where} does not match the expected Theia layout: " + "; ".join(problems))


def check_finite(name: str, tensor, where: str = "checkpoint") -> None:
    """CheckpointError naming tensor ``name`` (a torch tensor) when it holds NaN or +-Inf: such a
    checkpoint would publish NaN features. One pass over the values, cheap next to reading them."""
    import torch

    if not tensor.is_floating_point():
        return
    # a NaN or an Inf makes the sum non-finite (one fast reduction); a sum that overflows from finite
    # values only sends the tensor to the exact check below
    if bool(tensor.sum(dtype=torch.float32 if tensor.element_size() < 4 else None).isfinite()):
        return
    finite = tensor.isfinite()
    if bool(finite.all()):
        return
    nan, bad = int(tensor.isnan().sum()), int((~finite).sum())
    shape = "x".join(map(str, tensor.shape)) or "scalar"
    raise CheckpointError(f"{where}: tensor {name!r} ({shape}) holds {nan} NaN and {bad - nan} infinite "
                          "value(s); refusing to load it")


_HASH_CACHE: Dict[tuple, str] = {}


_HASH_LOCK = threading.Lock()


def file_sha256(path: Union[str, Path], chunk_size: int = 4 * 2**20) -> str:
    """Hex sha256 of a file's bytes, read in chunks; cached per (path, size, mtime, inode)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    hexdigest = sha256_file(path, chunk_size)
    with _HASH_LOCK:
        _HASH_CACHE[key] = hexdigest
    return hexdigest
