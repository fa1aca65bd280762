"""Distillation / fine-tuning run: sources -> cached teacher features -> student training -> checkpoint.

    from theia_ros.distill import DistillConfig, distill
    result = distill(DistillConfig(out="runs/tiny", images=["data/imgs"], teachers=["clip", "dinov2"],
                                   from_scratch="theia-tiny-patch16-224-cdiv", steps=1000, batch=64))

What a run does, in order (every stage resumes):

1. index the images (folders, bags), split train / held-out deterministically (``holdout``);
2. decode them to 224x224 uint8 into the cache, then run each teacher over the shards that are
   missing (a teacher is not even built when its shards are all there);
3. per-teacher per-channel mean / std of the targets over the training images;
4. train the student: loss 0.9 x cosine + 0.1 x SmoothL1 per teacher, averaged; AdamW
   (0.9, 0.999, weight decay 0.01 on matrices, none on biases / norms / embeddings' vectors),
   lr 2e-3 x global batch / 512 unless given, linear warm-up over the first 10% of the steps
   (from 1% of the lr), then constant; bf16 autocast on GPUs; DDP under torchrun;
5. checkpoints (model, optimizer, scheduler, step, RNG, history) every ``save_every`` steps,
   ``resume`` continues the same loss curve; evaluation on held-out images; a loss plot;
6. the student written in the published layout (``config.json`` + ``model.safetensors``) plus the
   target statistics (``target_feature_stats.safetensors``), readable by ``load_model``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from theia_ros.distill.cache import FeatureCache, teacher_dir_name
from theia_ros.distill.sources import build_index, dataset_id, make_sources, split_items
from theia_ros.distill.student import (
    STATS_FILE,
    StudentForward,
    build_student,
    distill_loss,
    map_cosine,
    write_feature_stats,
    write_published,
)
from theia_ros.distill.teachers import TEACHER_MODES, build_teacher, specs_for, teacher_fingerprint
from theia_ros.preprocess import to_model_input

__all__ = ["DistillConfig", "DistillResult", "StreamSampler", "distill", "lr_factor", "plot_history"]

CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class DistillConfig:
    out: str
    images: Sequence[str] = ()
    bags: Sequence[str] = ()
    bag_topics: Optional[Sequence[str]] = None
    bag_stride: int = 1
    bag_block_s: float = 10.0
    teachers: Sequence[str] = ("clip", "dinov2", "vit")
    teacher_mode: str = "pretrained"  # "pretrained" | "random" (full size, random weights) | "small" (tests)
    teacher_revision: Optional[str] = None
    teacher_batch: int = 16
    teacher_precision: str = "fp32"
    init: Optional[str] = None  # checkpoint to fine-tune (load_model source)
    from_scratch: Optional[str] = None  # variant / backbone / size to train from scratch
    cache: Optional[str] = None  # default: <out>/cache
    shard_size: int = 1000
    cache_dtype: str = "bf16"
    holdout: float = 0.05
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch: int = 64  # per process
    lr: Optional[float] = None  # default 2e-3 * global batch / 512
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup: float = 0.1
    warmup_start: float = 0.01
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    num_workers: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the start and the end only
    eval_images: int = 512
    evaluate: bool = True  # held-out evaluation (start, every eval_every steps, end)
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # None, "latest" or a checkpoint path
    stop_after: Optional[int] = None  # stop (with a checkpoint) at this step, schedule planned for `steps`
    overwrite: bool = False
    extract_only: bool = False
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    plot: bool = True
    ddp: Optional[bool] = None  # None: when WORLD_SIZE > 1
    teacher_cache_dir: Optional[str] = None  # Hugging Face cache for teacher weights


@dataclasses.dataclass
class DistillResult:
    out: Path
    cache_dir: Path
    step: int
    steps: int
    history: List[dict]
    evals: List[dict]
    teacher_forward_calls: Dict[str, int]
    teacher_images: Dict[str, int]
    train_images: int
    held_out_images: int
    model: Optional[torch.nn.Module]
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    lr: float
    global_batch: int
    images_per_s: float
    wall_s: float


# ---------------------------------------------------------------------------------------------
# pieces


def lr_factor(step: int, warmup_steps: int, start: float = 0.01) -> float:
    """Linear warm-up from ``start`` to 1 over ``warmup_steps``, then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps


class StreamSampler:
    """Deterministic, stateless batches: step s takes positions [s*G, (s+1)*G) of an endless stream
    of per-epoch permutations of the training indices (seeded by seed and epoch). Resuming at any
    step needs no saved state; rank r of W takes the r-th slice of each global batch."""

    def __init__(self, indices: Sequence[int], global_batch: int, seed: int = 0):
        if not indices:
            raise ValueError("no training images")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = self.indices[torch.randperm(len(self.indices), generator=g).numpy()]
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = perm
        return perm

    def global_batch_at(self, step: int) -> List[int]:
        n = len(self.indices)
        out = []
        for p in range(step * self.global_batch, (step + 1) * self.global_batch):
            out.append(int(self._perm(p // n)[p % n]))
        return out

    def rank_batch(self, step: int, rank: int, world: int) -> List[int]:
        per = self.global_batch // world
        return self.global_batch_at(step)[rank * per:(rank + 1) * per]

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / len(self.indices)


class _StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item s is rank's batch of step s (DataLoader workers can prefetch)."""

    def __init__(self, sampler: StreamSampler, reader, rank: int, world: int):
        self.sampler, self.reader, self.rank, self.world = sampler, reader, rank, world

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, step: int):
        return self.reader.batch(self.sampler.rank_batch(int(step), self.rank, self.world))


class _Dist:
    def __init__(self, cfg: DistillConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = cfg.ddp if cfg.ddp is not None else self.world > 1
        if not self.enabled and self.world > 1:
            raise RuntimeError("WORLD_SIZE > 1 but ddp=False")
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.created = False
        if self.enabled:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
                self.created = True
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
        else:
            self.world, self.rank = 1, 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def mean(self, values: List[float]) -> List[float]:
        if not self.enabled or self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum(self, values: List[float]) -> List[float]:
        if not self.enabled or self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _short(teacher_id: str) -> str:
    return teacher_id.split("/")[-1]


def plot_history(history: Sequence[dict], evals: Sequence[dict], teachers: Sequence[str], path) -> Optional[Path]:
    """PNG of per-teacher training losses (and held-out cosine) against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [h["step"] for h in history]
    window = max(1, len(history) // 50)
    for t in list(teachers) + ["total"]:
        key = "loss" if t == "total" else f"loss/{t}"
        values = np.array([h[key] for h in history], dtype=float)
        if len(values) >= window > 1:
            values = np.convolve(values, np.ones(window) / window, mode="valid")
            xs = steps[window - 1:]
        else:
            xs = steps
        axes[0].plot(xs, values, label=_short(t), linewidth=2.0 if t == "total" else 1.2,
                     color="black" if t == "total" else None)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (0.9 cos + 0.1 SmoothL1)" + (f", mean of {window}" if window > 1 else ""))
    axes[0].set_title("training loss per teacher")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if evals:
        for t in teachers:
            axes[1].plot([e["step"] for e in evals], [e[f"cos/{t}"] for e in evals], marker="o", label=_short(t))
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("cosine to teacher (normalised maps)")
        axes[1].set_title("held-out images")
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=8)
    else:
        axes[1].axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the run


def _checkpoints(directory: Path) -> List[Path]:
    return sorted(directory.glob("step-*.pt"))


def _run_fingerprint(cfg: DistillConfig, dataset: str, split: str, targets: Dict[str, tuple], global_batch: int,
                     lr: float) -> dict:
    return {"dataset": dataset, "split": split, "targets": {t: list(s) for t, s in targets.items()},
            "global_batch": global_batch, "lr": lr, "seed": cfg.seed, "init": cfg.init,
            "from_scratch": cfg.from_scratch, "weight_decay": cfg.weight_decay, "betas": list(cfg.betas)}


def distill(cfg: DistillConfig, log_fn: Optional[Callable[[str], None]] = None) -> DistillResult:
    """Run (or resume) a distillation; see the module docstring. Returns a :class:`DistillResult`."""
    t_start = time.perf_counter()
    if cfg.teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {cfg.teacher_mode!r}")
    if not cfg.extract_only and (cfg.init is None) == (cfg.from_scratch is None):
        raise ValueError("give exactly one of init (fine-tune a checkpoint) or from_scratch (a variant)")
    if not cfg.extract_only and cfg.steps is None and cfg.epochs is None:
        raise ValueError("give steps or epochs")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dist = _Dist(cfg)
    if log_fn is None:
        def log_fn(msg):
            print(msg, file=sys.stderr, flush=True)
    log = log_fn if dist.main else (lambda msg: None)
    try:
        return _distill(cfg, dist, log, t_start)
    finally:
        dist.close()


def _distill(cfg: DistillConfig, dist: _Dist, log, t_start: float) -> DistillResult:
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if dist.main:
        _prepare_out(cfg, out, ckpt_dir)
    images = _index_images(cfg, dist, out, log)
    teachers = _cache_teacher_features(cfg, dist, images, log)
    _target_stats(dist, images, teachers)

    global_batch = cfg.batch * dist.world
    lr = cfg.lr if cfg.lr is not None else 2e-3 * global_batch / 512
    if cfg.extract_only:
        log("distill: features cached (extract only)")
        return DistillResult(out, images.cache.dir, 0, 0, [], [], teachers.calls, teachers.images_seen,
                             len(images.train_idx), len(images.held_idx), None, teachers.stats, lr, global_batch, 0.0,
                             time.perf_counter() - t_start)
    steps = (int(cfg.steps) if cfg.steps is not None
             else max(1, math.ceil(cfg.epochs * len(images.train_idx) / global_batch)))

    trainer = _Trainer(cfg, dist, images, teachers, out=out, ckpt_dir=ckpt_dir, global_batch=global_batch, lr=lr,
                       steps=steps, log=log)
    if cfg.resume:
        trainer.resume(cfg.resume)
    images_per_s = trainer.run()
    dist.barrier()
    model = trainer.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dist.main:
        _write_outputs(cfg, out, trainer, images, teachers, images_per_s, log)
    dist.barrier()
    return DistillResult(out, images.cache.dir, trainer.step, steps, trainer.history, trainer.evals, teachers.calls,
                         teachers.images_seen, len(images.train_idx), len(images.held_idx), model, teachers.stats, lr,
                         global_batch, images_per_s, time.perf_counter() - t_start)


def _prepare_out(cfg: DistillConfig, out: Path, ckpt_dir: Path) -> None:
    """Create the output folder; refuse to mix with an earlier run's checkpoints unless told."""
    out.mkdir(parents=True, exist_ok=True)
    if _checkpoints(ckpt_dir) and not cfg.resume and not cfg.extract_only:
        if not cfg.overwrite:
            raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run: pass resume to continue "
                                  "it, overwrite to start over, or another output folder")
        shutil.rmtree(ckpt_dir)


@dataclasses.dataclass
class _Images:
    """The indexed images, decoded into the cache, and their train / held-out split (decodable ones)."""

    dataset: str
    cache: FeatureCache
    train_idx: List[int]
    held_idx: List[int]


def _index_images(cfg: DistillConfig, dist: _Dist, out: Path, log) -> _Images:
    """Stage 1 (and the decoding of stage 2): index the sources, split them, decode the images into the
    cache (main process)."""
    sources = make_sources(cfg.images, cfg.bags, cfg.bag_topics, cfg.bag_stride, cfg.bag_block_s)
    items = build_index(sources)
    if not items:
        raise ValueError(f"no images found in {', '.join(map(str, list(cfg.images) + list(cfg.bags)))}")
    dataset = dataset_id(sources, items)
    train_all, held_all = split_items(items, cfg.holdout, cfg.seed)
    cache = FeatureCache(cfg.cache or out / "cache", sources, items, dataset, shard_size=cfg.shard_size,
                         feature_dtype=cfg.cache_dtype)
    log(f"distill: {len(items)} image(s) from {len(sources)} source(s); cache {cache.dir}")
    if dist.main:
        cache.ensure_images(log)
    dist.barrier()
    valid = cache.valid
    train_idx = [i for i in train_all if valid[i]]
    held_idx = [i for i in held_all if valid[i]]
    bad = int((~valid).sum())
    if bad:
        log(f"distill: {bad} undecodable image(s) left out")
    log(f"distill: {len(train_idx)} training image(s), {len(held_idx)} held out")
    return _Images(dataset, cache, train_idx, held_idx)


@dataclasses.dataclass
class _TeacherFeatures:
    """The teachers' cached feature maps and their per-channel statistics over the training images."""

    specs: list
    mode: str
    ids: List[str]  # model ids, in the order of the student's heads
    targets: Dict[str, Tuple[int, int, int]]
    dirs: Dict[str, str]  # model id -> cache folder
    calls: Dict[str, int]  # model id -> teacher forward calls this run
    images_seen: Dict[str, int]
    split: str = ""  # identity of the training split the statistics are over
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


def _cache_teacher_features(cfg: DistillConfig, dist: _Dist, images: _Images, log) -> _TeacherFeatures:
    """Stage 2: run each teacher over the shards it is missing (a teacher is built only then), one at a
    time so that one teacher's weights are in memory at once."""
    specs = specs_for(cfg.teachers)
    if not specs:
        raise ValueError("no teachers")
    mode = cfg.teacher_mode
    device = dist.device
    found = _TeacherFeatures(specs, mode, [s.model_id for s in specs], {s.model_id: s.target_for(mode) for s in specs},
                             {}, {}, {})
    for spec in specs:
        fp = teacher_fingerprint(spec, mode, seed=cfg.seed, revision=cfg.teacher_revision)
        found.dirs[spec.model_id] = teacher_dir_name(spec.model_id, mode, fp)

        def make(spec=spec):
            log(f"distill: building teacher {spec.name} ({spec.model_id}, {mode})")
            return build_teacher(spec, mode, device=device, seed=cfg.seed, revision=cfg.teacher_revision,
                                 cache_dir=cfg.teacher_cache_dir, precision=cfg.teacher_precision)

        _, teacher = images.cache.ensure_teacher(found.dirs[spec.model_id], fp, found.targets[spec.model_id], make,
                                                 batch=cfg.teacher_batch, rank=dist.rank, world=dist.world,
                                                 log_fn=log)
        found.calls[spec.model_id] = teacher.calls if teacher is not None else 0
        found.images_seen[spec.model_id] = teacher.images if teacher is not None else 0
        del teacher
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    return found


def _target_stats(dist: _Dist, images: _Images, teachers: _TeacherFeatures) -> None:
    """Stage 3: per-teacher per-channel mean / std over the training images (computed and cached by the
    main process, then read by every process)."""
    teachers.split = hashlib.sha1((images.dataset + ":" + ",".join(map(str, images.train_idx))).encode()
                                  ).hexdigest()[:12]
    if dist.main:
        for t in teachers.ids:
            teachers.stats[t] = images.cache.teacher_stats(teachers.dirs[t], images.train_idx, teachers.split)
    dist.barrier()
    for t in teachers.ids:
        teachers.stats[t] = images.cache.teacher_stats(teachers.dirs[t], images.train_idx, teachers.split)


class _Trainer:
    """Stages 4 and 5: the student and its optimiser, the training loop, held-out evaluation and
    checkpoints (with ``resume``, the same loss curve continues)."""

    def __init__(self, cfg: DistillConfig, dist: _Dist, images: _Images, teachers: _TeacherFeatures, *, out: Path,
                 ckpt_dir: Path, global_batch: int, lr: float, steps: int, log):
        self.cfg, self.dist, self.images, self.teachers, self.log = cfg, dist, images, teachers, log
        self.device = dist.device
        self.out, self.ckpt_dir = out, ckpt_dir
        self.global_batch, self.lr, self.steps = global_batch, lr, steps
        self.warmup_steps = int(round(cfg.warmup * steps))
        self.stop = min(steps, cfg.stop_after) if cfg.stop_after else steps

        model, info = build_student(teachers.targets, init=cfg.init, from_scratch=cfg.from_scratch, seed=cfg.seed)
        log(f"distill: student {model.config.backbone} ({model.num_parameters / 1e6:.2f} M parameters); "
            f"heads copied: {', '.join(map(_short, info['heads_copied'])) or 'none'}; "
            f"new: {', '.join(map(_short, info['heads_new'])) or 'none'}")
        model.to(self.device)
        self.model = model
        self.student = StudentForward(model, teachers.ids)
        self.forward = self.student
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup_steps, cfg.warmup_start))
        self.fingerprint = _run_fingerprint(cfg, images.dataset, teachers.split, teachers.targets, global_batch, lr)
        self.history: List[dict] = []
        self.evals: List[dict] = []
        self.step = 0

    def resume(self, resume: str) -> None:
        """Continue from a checkpoint ("latest" in ckpt_dir, or a path) made with the same settings."""
        path = None
        if resume == "latest":
            found = _checkpoints(self.ckpt_dir)
            path = found[-1] if found else None
            if path is None:
                self.log(f"distill: no checkpoint in {self.ckpt_dir}: starting from step 0")
        else:
            path = Path(resume)
        if path is None:
            return
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a distillation checkpoint of this version")
        diff = {k: (ckpt["run"].get(k), v) for k, v in self.fingerprint.items() if ckpt["run"].get(k) != v}
        if diff:
            raise ValueError(f"{path}: checkpoint was made with other settings: "
                             + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items()))
        if ckpt["steps"] != self.steps:
            self.log(f"distill: warning: the checkpoint planned {ckpt['steps']} steps, now {self.steps} "
                     "(the warm-up length changes)")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt["history"])
        self.evals = list(ckpt["evals"])
        self.log(f"distill: resumed from {path} at step {self.step}")

    def run(self) -> float:
        """Train from the current step to the stop step, evaluating and checkpointing on the way;
        returns the training throughput in images per second."""
        cfg, dist, ids = self.cfg, self.dist, self.teachers.ids
        self.log_path = self.out / "train_log.jsonl"
        if dist.main:
            self.log_path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        self.reader = self.images.cache.reader([self.teachers.dirs[t] for t in ids])
        self.sampler = StreamSampler(self.images.train_idx, self.global_batch, cfg.seed)
        self.means = [self.teachers.stats[t][0].to(self.device).view(1, 1, -1) for t in ids]
        self.stds = [self.teachers.stats[t][1].to(self.device).view(1, 1, -1) for t in ids]
        self.use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")

        do_eval = bool(self.images.held_idx) and cfg.evaluate
        if do_eval and self.step == 0 and not self.evals:
            self._evaluate_and_log()
        images_per_s = self._train_loop(do_eval)
        if do_eval and (not self.evals or self.evals[-1]["step"] != self.step):
            self._evaluate_and_log(final=True)
        self.save()
        return images_per_s

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_amp else contextlib.nullcontext()

    def _prepare(self, images, feats):
        """Model input and normalised targets [B, tokens, C] on the device."""
        pixels = to_model_input(images.to(self.device, non_blocking=True))
        tgts = [((f.to(self.device, non_blocking=True).float().flatten(2).transpose(1, 2)) - m) / s
                for f, m, s in zip(feats, self.means, self.stds)]
        return pixels, tgts

    def _train_loop(self, do_eval: bool) -> float:
        """Steps up to `stop` with progress logs, periodic evaluation and checkpoints; returns images/s."""
        cfg, dist, ids = self.cfg, self.dist, self.teachers.ids
        self.log(f"distill: steps {self.step}->{self.stop} of {self.steps}, batch {cfg.batch} x {dist.world}, "
                 f"lr {self.lr:.3g} (warm-up {self.warmup_steps} steps), amp {'bf16' if self.use_amp else 'off'}, "
                 f"device {self.device}")
        loader = torch.utils.data.DataLoader(
            _StepBatches(self.sampler, self.reader, dist.rank, dist.world), batch_size=None,
            sampler=range(self.step, self.stop), num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
        window_t, window_steps = time.perf_counter(), 0
        train_t, train_images = 0.0, 0
        step_time_ema = None
        self.model.train()
        for images, feats in loader:
            rec = self._train_step(images, feats)
            window_steps += 1
            train_images += self.global_batch
            step = self.step
            if cfg.log_every and (step % cfg.log_every == 0 or step == self.stop):
                now = time.perf_counter()
                per_step = (now - window_t) / window_steps
                train_t += now - window_t
                step_time_ema = per_step if step_time_ema is None else 0.7 * step_time_ema + 0.3 * per_step
                per_teacher = " ".join(f"{_short(t)} {rec[f'loss/{t}']:.4f}" for t in ids)
                eta = _fmt_time(step_time_ema * (self.stop - step))
                self.log(f"step {step}/{self.steps} loss {rec['loss']:.4f} [{per_teacher}] lr {rec['lr']:.3g} "
                         f"{self.global_batch / per_step:.1f} img/s ETA {eta}")
                window_t, window_steps = time.perf_counter(), 0
            if do_eval and cfg.eval_every and step % cfg.eval_every == 0 and step != self.stop:
                self._evaluate_and_log()
                window_t = time.perf_counter()
            if cfg.save_every and step % cfg.save_every == 0 and step != self.stop:
                self.save()
                window_t = time.perf_counter()
        if window_steps:
            train_t += time.perf_counter() - window_t
        return train_images / train_t if train_t > 0 else 0.0

    def _train_step(self, images, feats) -> dict:
        """One optimiser step; its record (loss per teacher, averaged over processes) is appended to the
        history and the log file."""
        pixels, tgts = self._prepare(images, feats)
        with self._autocast():
            preds = self.forward(pixels)
        loss, parts = distill_loss(preds, tgts)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        values = self.dist.mean([float(loss.detach())] + [float(v.detach()) for p in parts for v in p])
        rec = {"step": self.step, "loss": values[0], "lr": lr_now,
               "epoch": round(self.sampler.epoch_at(self.step), 4)}
        for k, t in enumerate(self.teachers.ids):
            rec[f"loss/{t}"], rec[f"cos_loss/{t}"], rec[f"l1/{t}"] = values[1 + 3 * k: 4 + 3 * k]
        self.history.append(rec)
        if self.dist.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def _evaluate_and_log(self, final: bool = False) -> None:
        self.evals.append(self.evaluate())
        note = f" (start {self.evals[0]['cos']:.4f})" if final else ""
        self.log(f"distill: held-out cosine at step {self.step}: {self.evals[-1]['cos']:.4f}{note}")

    def evaluate(self) -> dict:
        """Mean cosine and loss per teacher on the held-out images (shared among the processes)."""
        cfg, dist, ids = self.cfg, self.dist, self.teachers.ids
        held = self.images.held_idx[:cfg.eval_images] if cfg.eval_images else self.images.held_idx
        mine = held[dist.rank::dist.world]
        sums = [0.0] * (2 * len(ids))
        count = 0
        self.model.eval()
        with torch.no_grad():
            for s in range(0, len(mine), cfg.batch):
                pixels, tgts = self._prepare(*self.reader.batch(mine[s:s + cfg.batch]))
                with self._autocast():
                    preds = self.student(pixels)
                _, parts = distill_loss(preds, tgts)
                for k, (pred, tgt, (loss, _, _)) in enumerate(zip(preds, tgts, parts)):
                    n = pixels.shape[0]
                    sums[2 * k] += float(map_cosine(pred, tgt).sum())
                    sums[2 * k + 1] += float(loss) * n
                count += pixels.shape[0]
        self.model.train()
        totals = dist.sum(sums + [float(count)])
        n = max(totals[-1], 1.0)
        rec = {"step": self.step, "images": int(totals[-1])}
        for k, t in enumerate(ids):
            rec[f"cos/{t}"] = totals[2 * k] / n
            rec[f"loss/{t}"] = totals[2 * k + 1] / n
        rec["cos"] = float(np.mean([rec[f"cos/{t}"] for t in ids]))
        rec["loss"] = float(np.mean([rec[f"loss/{t}"] for t in ids]))
        return rec

    def save(self) -> None:
        """Checkpoint of the current step (main process); older ones beyond keep_checkpoints go."""
        if not self.dist.main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "step": self.step, "steps": self.steps, "run": self.fingerprint,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "history": self.history,
                 "evals": self.evals, "teachers": self.teachers.ids}
        path = self.ckpt_dir / f"step-{self.step:08d}.pt"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in _checkpoints(self.ckpt_dir)[:-max(1, self.cfg.keep_checkpoints)]:
            old.unlink()


def _write_outputs(cfg: DistillConfig, out: Path, trainer: _Trainer, images: _Images, teachers: _TeacherFeatures,
                   images_per_s: float, log) -> None:
    """Stage 6: the student in the published layout, its target statistics, the loss plot and a summary."""
    step, steps, history, evals = trainer.step, trainer.steps, trainer.history, trainer.evals
    extra = {"theia_ros_distill": {
        "teachers": {s.model_id: {"name": s.name, "mode": teachers.mode, "cache": teachers.dirs[s.model_id]}
                     for s in teachers.specs},
        "init": cfg.init, "from_scratch": cfg.from_scratch, "step": step, "steps": steps,
        "global_batch": trainer.global_batch, "lr": trainer.lr, "dataset": images.dataset,
        "train_images": len(images.train_idx), "held_out_images": len(images.held_idx),
        "feature_stats": STATS_FILE,
        "held_out_cosine": evals[-1]["cos"] if evals else None,
        "targets_normalised": "per teacher, per channel: (x - mean) / std, see " + STATS_FILE}}
    write_published(trainer.model, out, extra)
    write_feature_stats(out, {t: teachers.stats[t] for t in teachers.ids})
    if cfg.plot and history:
        plot_history(history, evals, teachers.ids, out / "losses.png")
    summary = {"step": step, "steps": steps, "train_images": len(images.train_idx),
               "held_out_images": len(images.held_idx), "images_per_s": images_per_s,
               "teacher_forward_calls": teachers.calls, "evals": evals,
               "final_loss": history[-1]["loss"] if history else None}
    (out / "distill_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"distill: wrote {out / 'model.safetensors'} (step {step} of {steps}"
        f"{', stopped early' if step < steps else ''})")
