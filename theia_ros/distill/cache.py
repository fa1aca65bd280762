"""On-disk cache of the 224x224 images and the teachers' feature maps, in resumable shards.

Layout (``<cache>/<dataset id>-s<shard size>/``)::

    index.json                                   the image keys, in order (what the shards hold)
    images/shard-000000.safetensors              "images" uint8 [n, 224, 224, 3], "valid" uint8 [n]
    teachers/<teacher>-<mode>-<fingerprint>/
        shard-000000.safetensors                 "features" [n, C, H, W] (bf16 by default)
        stats-<split id>.safetensors             per-channel "mean", "std" over the training images

Shard i holds items ``[i * shard_size, (i + 1) * shard_size)`` of the index. A shard is written
to a temporary name and renamed into place, so a shard that exists is complete; its metadata
(dataset id, shard number, range, teacher fingerprint) is checked before it is reused. A run that
was killed resumes where it stopped, and a second run over the same images reuses every shard: a
teacher is only built when some shard of it is missing. The feature maps are stored raw (not
normalised), so a different split only recomputes the statistics.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from theia_ros.distill.sources import IMAGE_SIZE, ImageItem

log = logging.getLogger(__name__)

__all__ = ["FeatureCache", "CacheReader", "CACHE_DTYPES", "teacher_dir_name"]

CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FORMAT = "theia-distill-cache-v1"


def teacher_dir_name(model_id: str, mode: str, fingerprint: str) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in model_id)
    return f"{safe}-{mode}-{fingerprint[:12]}"


def _save_atomic(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _metadata(path: Path) -> Optional[Dict[str, str]]:
    """The safetensors metadata of a complete, readable shard, else None."""
    from safetensors import safe_open

    from theia_ros.weights import CheckpointError, read_safetensors_header

    if not path.is_file():
        return None
    try:
        read_safetensors_header(path)  # checks that every tensor lies inside the file
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
        log.warning("ignoring unreadable cache shard %s: %s", path, exc)
        return None


class FeatureCache:
    """Images and teacher features of one indexed dataset, sharded on disk."""

    def __init__(self, root, sources: Sequence, items: Sequence[ImageItem], dataset: str, *,
                 shard_size: int = 1000, feature_dtype: str = "bf16"):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        if feature_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {feature_dtype!r}")
        self.sources = list(sources)
        self.items = list(items)
        self.dataset = dataset
        self.shard_size = int(shard_size)
        self.feature_dtype = feature_dtype
        self.dir = Path(root) / f"{dataset}-s{self.shard_size}"
        n = len(self.items)
        self.shards = [(s, min(s + self.shard_size, n)) for s in range(0, n, self.shard_size)]
        self._valid: Optional[np.ndarray] = None

    # ---- paths -----------------------------------------------------------------------------
    def image_path(self, shard: int) -> Path:
        return self.dir / "images" / f"shard-{shard:06d}.safetensors"

    def teacher_dir(self, name: str) -> Path:
        return self.dir / "teachers" / name

    def teacher_path(self, name: str, shard: int) -> Path:
        return self.teacher_dir(name) / f"shard-{shard:06d}.safetensors"

    def _shard_meta(self, shard: int, kind: str, **extra) -> Dict[str, str]:
        start, stop = self.shards[shard]
        meta = {"format": _FORMAT, "kind": kind, "dataset": self.dataset, "shard": str(shard),
                "start": str(start), "stop": str(stop)}
        meta.update({k: str(v) for k, v in extra.items()})
        return meta

    def _complete(self, path: Path, expected: Dict[str, str]) -> bool:
        meta = _metadata(path)
        return meta is not None and all(meta.get(k) == v for k, v in expected.items())

    def write_index(self) -> None:
        path = self.dir / "index.json"
        if path.is_file():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".index.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"format": _FORMAT, "dataset": self.dataset, "shard_size": self.shard_size,
                                   "image_size": IMAGE_SIZE, "keys": [it.key for it in self.items]}, indent=0))
        os.replace(tmp, path)

    # ---- images ----------------------------------------------------------------------------
    def missing_image_shards(self) -> List[int]:
        return [i for i in range(len(self.shards))
                if not self._complete(self.image_path(i), self._shard_meta(i, "images"))]

    def ensure_images(self, log_fn: Callable[[str], None] = log.info) -> int:
        """Decode and write every missing image shard (sources read in order). Returns shards written."""
        self.write_index()
        missing = self.missing_image_shards()
        if not missing:
            return 0
        t0 = time.perf_counter()
        log_fn(f"cache: decoding images for {len(missing)} of {len(self.shards)} shard(s) into {self.dir}")
        missing_set = set(missing)
        buffers: Dict[int, Dict[int, Optional[np.ndarray]]] = {}
        written = 0
        by_source: Dict[int, List[Tuple[int, ImageItem]]] = {}
        for idx, item in enumerate(self.items):
            if idx // self.shard_size in missing_set:
                by_source.setdefault(item.source, []).append((idx, item))
        for source_index, wanted in sorted(by_source.items()):
            position = {item.key: idx for idx, item in wanted}
            for item, rgb in self.sources[source_index].load([item for _, item in wanted]):
                idx = position[item.key]
                shard = idx // self.shard_size
                buffers.setdefault(shard, {})[idx] = rgb
                start, stop = self.shards[shard]
                if len(buffers[shard]) == stop - start:
                    self._write_image_shard(shard, buffers.pop(shard))
                    written += 1
        for shard, buf in sorted(buffers.items()):  # items a source failed to deliver
            self._write_image_shard(shard, buf)
            written += 1
        log_fn(f"cache: wrote {written} image shard(s) in {time.perf_counter() - t0:.1f} s")
        self._valid = None
        return written

    def _write_image_shard(self, shard: int, buf: Dict[int, Optional[np.ndarray]]) -> None:
        start, stop = self.shards[shard]
        images = np.zeros((stop - start, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        valid = np.zeros((stop - start,), dtype=np.uint8)
        for idx, rgb in buf.items():
            if rgb is not None:
                images[idx - start] = rgb
                valid[idx - start] = 1
        _save_atomic({"images": torch.from_numpy(images), "valid": torch.from_numpy(valid)},
                     self.image_path(shard), self._shard_meta(shard, "images"))

    def load_images(self, shard: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load_file

        data = load_file(str(self.image_path(shard)))
        return data["images"], data["valid"].bool()

    @property
    def valid(self) -> np.ndarray:
        """bool [N]: which items decoded (undecodable ones are left out of training and statistics)."""
        if self._valid is None:
            from safetensors import safe_open

            valid = np.zeros(len(self.items), dtype=bool)
            for i, (start, stop) in enumerate(self.shards):
                with safe_open(str(self.image_path(i)), framework="pt") as f:
                    valid[start:stop] = f.get_tensor("valid").numpy().astype(bool)
            self._valid = valid
        return self._valid

    # ---- teacher features ------------------------------------------------------------------
    def missing_teacher_shards(self, name: str, fingerprint: str, shards: Optional[Sequence[int]] = None) -> List[int]:
        shards = range(len(self.shards)) if shards is None else shards
        return [i for i in shards if not self._complete(
            self.teacher_path(name, i), self._shard_meta(i, "features", teacher=fingerprint))]

    def ensure_teacher(self, name: str, fingerprint: str, target: Tuple[int, int, int],
                       make_teacher: Callable[[], Callable[[torch.Tensor], torch.Tensor]], *, batch: int = 16,
                       rank: int = 0, world: int = 1, log_fn: Callable[[str], None] = log.info):
        """Compute this teacher's missing shards (this rank's share: shard % world == rank).

        ``make_teacher`` is only called when something is missing. Returns (shards written, teacher or None)."""
        mine = [i for i in range(len(self.shards)) if i % world == rank]
        missing = self.missing_teacher_shards(name, fingerprint, mine)
        if not missing:
            return 0, None
        teacher = make_teacher()
        dtype = CACHE_DTYPES[self.feature_dtype]
        t0 = time.perf_counter()
        done_images = 0
        total_images = sum(self.shards[i][1] - self.shards[i][0] for i in missing)
        log_fn(f"cache: teacher {name}: {len(missing)} shard(s), {total_images} image(s) to compute")
        for count, shard in enumerate(missing, 1):
            images, _ = self.load_images(shard)
            chunks = []
            for s in range(0, images.shape[0], batch):
                fmap = teacher(images[s:s + batch])
                if tuple(fmap.shape[1:]) != tuple(target):
                    raise RuntimeError(f"teacher {name} produced {tuple(fmap.shape[1:])}, expected {tuple(target)}")
                chunks.append(fmap.to(dtype))
            _save_atomic({"features": torch.cat(chunks)}, self.teacher_path(name, shard),
                         self._shard_meta(shard, "features", teacher=fingerprint,
                                          target=",".join(map(str, target)), dtype=self.feature_dtype))
            done_images += images.shape[0]
            elapsed = time.perf_counter() - t0
            rate = done_images / max(elapsed, 1e-9)
            eta = (total_images - done_images) / max(rate, 1e-9)
            log_fn(f"cache: teacher {name}: shard {count}/{len(missing)}, {rate:.1f} images/s, ETA {eta:.0f} s")
        return len(missing), teacher

    def teacher_stats(self, name: str, train: Sequence[int], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of this teacher's maps over the ``train`` items (cached per split)."""
        from safetensors.torch import load_file

        path = self.teacher_dir(name) / f"stats-{split}.safetensors"
        if _metadata(path) is not None:
            data = load_file(str(path))
            return data["mean"], data["std"]
        train = np.asarray(sorted(train), dtype=np.int64)
        total = sq = None
        count = 0
        for shard, (start, stop) in enumerate(self.shards):
            rows = train[(train >= start) & (train < stop)] - start
            if rows.size == 0:
                continue
            feats = load_file(str(self.teacher_path(name, shard)))["features"][torch.from_numpy(rows)].double()
            s = feats.sum(dim=(0, 2, 3))
            q = feats.square().sum(dim=(0, 2, 3))
            total = s if total is None else total + s
            sq = q if sq is None else sq + q
            count += feats.shape[0] * feats.shape[2] * feats.shape[3]
        if count == 0:
            raise ValueError("no training images to compute feature statistics from")
        mean = total / count
        var = (sq / count - mean.square()).clamp_min(0.0)
        std = var.sqrt()
        std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant channels: leave unscaled
        mean, std = mean.float(), std.float()
        _save_atomic({"mean": mean, "std": std}, path, {"format": _FORMAT, "count": str(count), "split": split})
        return mean, std

    def reader(self, teacher_dirs: Sequence[str]) -> "CacheReader":
        return CacheReader(self, list(teacher_dirs))


class CacheReader:
    """Random access to (image, [feature map per teacher]) of an item; safe for DataLoader workers."""

    def __init__(self, cache: FeatureCache, teacher_dirs: List[str], max_open: int = 64):
        self.cache = cache
        self.teacher_dirs = teacher_dirs
        self.max_open = max_open
        self._handles: "OrderedDict[str, object]" = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def _open(self, path: Path):
        from safetensors import safe_open

        key = str(path)
        handle = self._handles.get(key)
        if handle is None:
            handle = safe_open(key, framework="pt")
            self._handles[key] = handle
            while len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(key)
        return handle

    def get(self, index: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        shard, row = divmod(int(index), self.cache.shard_size)
        image = self._open(self.cache.image_path(shard)).get_slice("images")[row]
        feats = [self._open(self.cache.teacher_path(d, shard)).get_slice("features")[row] for d in self.teacher_dirs]
        return image, feats

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        got = [self.get(i) for i in indices]
        images = torch.stack([g[0] for g in got])
        feats = [torch.stack([g[1][t] for g in got]) for t in range(len(self.teacher_dirs))]
        return images, feats
