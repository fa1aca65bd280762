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

from theia_ros.preprocess import to_model_input

from theia_ros.distill.cache import FeatureCache, teacher_dir_name
from theia_ros.distill.sources import build_index, dataset_id, make_sources, split_items
from theia_ros.distill.student import STATS_FILE, StudentForward, build_student, distill_loss, map_cosine, write_feature_stats, \
    write_published
from theia_ros.distill.teachers import TEACHER_MODES, build_teacher, specs_for, teacher_fingerprint

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
    threads: Optional[int] = None
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
    device = dist.device
    if log_fn is None:
        def log_fn(msg):
            print(msg, file=sys.stderr, flush=True)
    log = log_fn if dist.main else (lambda msg: None)
    try:
        return _distill(cfg, dist, device, log, t_start)
    finally:
        dist.close()


def _distill(cfg: DistillConfig, dist: _Dist, device: torch.device, log, t_start: float) -> DistillResult:
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if _checkpoints(ckpt_dir) and not cfg.resume and not cfg.extract_only:
            if not cfg.overwrite:
                raise FileExistsError(f"{ckpt_dir} holds checkpoints of an earlier run: pass resume to continue "
                                      "it, overwrite to start over, or another output folder")
            shutil.rmtree(ckpt_dir)

    # ---- data and cache ----------------------------------------------------------------
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

    specs = specs_for(cfg.teachers)
    if not specs:
        raise ValueError("no teachers")
    mode = cfg.teacher_mode
    teacher_ids = [s.model_id for s in specs]
    targets: Dict[str, Tuple[int, int, int]] = {s.model_id: s.target_for(mode) for s in specs}
    dirs: Dict[str, str] = {}
    calls: Dict[str, int] = {}
    images_seen: Dict[str, int] = {}
    for spec in specs:
        fp = teacher_fingerprint(spec, mode, seed=cfg.seed, revision=cfg.teacher_revision)
        dirs[spec.model_id] = teacher_dir_name(spec.model_id, mode, fp)

        def make(spec=spec):
            log(f"distill: building teacher {spec.name} ({spec.model_id}, {mode})")
            return build_teacher(spec, mode, device=device, seed=cfg.seed, revision=cfg.teacher_revision,
                                 cache_dir=cfg.teacher_cache_dir, precision=cfg.teacher_precision)

        _, teacher = cache.ensure_teacher(dirs[spec.model_id], fp, targets[spec.model_id], make,
                                          batch=cfg.teacher_batch, rank=dist.rank, world=dist.world, log_fn=log)
        calls[spec.model_id] = teacher.calls if teacher is not None else 0
        images_seen[spec.model_id] = teacher.images if teacher is not None else 0
        del teacher
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    split = hashlib.sha1((dataset + ":" + ",".join(map(str, train_idx))).encode()).hexdigest()[:12]
    stats: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    if dist.main:
        for t in teacher_ids:
            stats[t] = cache.teacher_stats(dirs[t], train_idx, split)
    dist.barrier()
    for t in teacher_ids:
        stats[t] = cache.teacher_stats(dirs[t], train_idx, split)

    global_batch = cfg.batch * dist.world
    lr = cfg.lr if cfg.lr is not None else 2e-3 * global_batch / 512
    if cfg.extract_only:
        log("distill: features cached (extract only)")
        return DistillResult(out, cache.dir, 0, 0, [], [], calls, images_seen, len(train_idx), len(held_idx), None,
                             stats, lr, global_batch, 0.0, time.perf_counter() - t_start)
    steps = int(cfg.steps) if cfg.steps is not None else max(1, math.ceil(cfg.epochs * len(train_idx) / global_batch))
    warmup_steps = int(round(cfg.warmup * steps))
    stop = min(steps, cfg.stop_after) if cfg.stop_after else steps

    # ---- student, optimiser --------------------------------------------------------------
    model, info = build_student(targets, init=cfg.init, from_scratch=cfg.from_scratch, seed=cfg.seed)
    log(f"distill: student {model.config.backbone} ({model.num_parameters / 1e6:.2f} M parameters); "
        f"heads copied: {', '.join(map(_short, info['heads_copied'])) or 'none'}; "
        f"new: {', '.join(map(_short, info['heads_new'])) or 'none'}")
    model.to(device)
    student = StudentForward(model, teacher_ids)
    forward = student
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, cfg.warmup_start))
    fingerprint = _run_fingerprint(cfg, dataset, split, targets, global_batch, lr)

    history: List[dict] = []
    evals: List[dict] = []
    step = 0
    if cfg.resume:
        path = None
        if cfg.resume == "latest":
            found = _checkpoints(ckpt_dir)
            path = found[-1] if found else None
            if path is None:
                log(f"distill: no checkpoint in {ckpt_dir}: starting from step 0")
        else:
            path = Path(cfg.resume)
        if path is not None:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path}: not a distillation checkpoint of this version")
            diff = {k: (ckpt["run"].get(k), v) for k, v in fingerprint.items() if ckpt["run"].get(k) != v}
            if diff:
                raise ValueError(f"{path}: checkpoint was made with other settings: "
                                 + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items()))
            if ckpt["steps"] != steps:
                log(f"distill: warning: the checkpoint planned {ckpt['steps']} steps, now {steps} "
                    "(the warm-up length changes)")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"])
            step = int(ckpt["step"])
            history = list(ckpt["history"])
            evals = list(ckpt["evals"])
            log(f"distill: resumed from {path} at step {step}")

    log_path = out / "train_log.jsonl"
    if dist.main:
        log_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    reader = cache.reader([dirs[t] for t in teacher_ids])
    sampler = StreamSampler(train_idx, global_batch, cfg.seed)
    means = [stats[t][0].to(device).view(1, 1, -1) for t in teacher_ids]
    stds = [stats[t][1].to(device).view(1, 1, -1) for t in teacher_ids]
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()

    def prepare(images, feats):
        pixels = to_model_input(images.to(device, non_blocking=True))
        tgts = [((f.to(device, non_blocking=True).float().flatten(2).transpose(1, 2)) - m) / s
                for f, m, s in zip(feats, means, stds)]
        return pixels, tgts

    def evaluate(at_step: int) -> dict:
        held = held_idx[:cfg.eval_images] if cfg.eval_images else held_idx
        mine = held[dist.rank::dist.world]
        sums = [0.0] * (2 * len(teacher_ids))
        count = 0
        model.eval()
        with torch.no_grad():
            for s in range(0, len(mine), cfg.batch):
                pixels, tgts = prepare(*reader.batch(mine[s:s + cfg.batch]))
                with autocast():
                    preds = student(pixels)
                _, parts = distill_loss(preds, tgts)
                for k, (pred, tgt, (loss, _, _)) in enumerate(zip(preds, tgts, parts)):
                    n = pixels.shape[0]
                    sums[2 * k] += float(map_cosine(pred, tgt).sum())
                    sums[2 * k + 1] += float(loss) * n
                count += pixels.shape[0]
        model.train()
        totals = dist.sum(sums + [float(count)])
        n = max(totals[-1], 1.0)
        rec = {"step": at_step, "images": int(totals[-1])}
        for k, t in enumerate(teacher_ids):
            rec[f"cos/{t}"] = totals[2 * k] / n
            rec[f"loss/{t}"] = totals[2 * k + 1] / n
        rec["cos"] = float(np.mean([rec[f"cos/{t}"] for t in teacher_ids]))
        rec["loss"] = float(np.mean([rec[f"loss/{t}"] for t in teacher_ids]))
        return rec

    def save(at_step: int):
        if not dist.main:
            return
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {"format": CHECKPOINT_FORMAT, "step": at_step, "steps": steps, "run": fingerprint,
                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history, "evals": evals,
                 "teachers": teacher_ids}
        path = ckpt_dir / f"step-{at_step:08d}.pt"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in _checkpoints(ckpt_dir)[:-max(1, cfg.keep_checkpoints)]:
            old.unlink()

    do_eval = bool(held_idx) and cfg.evaluate
    if do_eval and step == 0 and not evals:
        evals.append(evaluate(step))
        log(f"distill: held-out cosine at step {step}: {evals[-1]['cos']:.4f}")

    # ---- training loop ---------------------------------------------------------------------
    log(f"distill: steps {step}->{stop} of {steps}, batch {cfg.batch} x {dist.world}, lr {lr:.3g} "
        f"(warm-up {warmup_steps} steps), amp {'bf16' if use_amp else 'off'}, device {device}")
    loader = torch.utils.data.DataLoader(
        _StepBatches(sampler, reader, dist.rank, dist.world), batch_size=None, sampler=range(step, stop),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
    window_t, window_steps = time.perf_counter(), 0
    train_t, train_images = 0.0, 0
    step_time_ema = None
    model.train()
    for images, feats in loader:
        pixels, tgts = prepare(images, feats)
        with autocast():
            preds = forward(pixels)
        loss, parts = distill_loss(preds, tgts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        values = dist.mean([float(loss.detach())] + [float(v.detach()) for p in parts for v in p])
        rec = {"step": step, "loss": values[0], "lr": lr_now, "epoch": round(sampler.epoch_at(step), 4)}
        for k, t in enumerate(teacher_ids):
            rec[f"loss/{t}"], rec[f"cos_loss/{t}"], rec[f"l1/{t}"] = values[1 + 3 * k: 4 + 3 * k]
        history.append(rec)
        if dist.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        window_steps += 1
        train_images += global_batch
        if cfg.log_every and (step % cfg.log_every == 0 or step == stop):
            now = time.perf_counter()
            per_step = (now - window_t) / window_steps
            train_t += now - window_t
            step_time_ema = per_step if step_time_ema is None else 0.7 * step_time_ema + 0.3 * per_step
            per_teacher = " ".join(f"{_short(t)} {rec[f'loss/{t}']:.4f}" for t in teacher_ids)
            log(f"step {step}/{steps} loss {rec['loss']:.4f} [{per_teacher}] lr {lr_now:.3g} "
                f"{global_batch / per_step:.1f} img/s ETA {_fmt_time(step_time_ema * (stop - step))}")
            window_t, window_steps = time.perf_counter(), 0
        if do_eval and cfg.eval_every and step % cfg.eval_every == 0 and step != stop:
            evals.append(evaluate(step))
            log(f"distill: held-out cosine at step {step}: {evals[-1]['cos']:.4f}")
            window_t = time.perf_counter()
        if cfg.save_every and step % cfg.save_every == 0 and step != stop:
            save(step)
            window_t = time.perf_counter()
    if window_steps:
        train_t += time.perf_counter() - window_t

    if do_eval and (not evals or evals[-1]["step"] != step):
        evals.append(evaluate(step))
        log(f"distill: held-out cosine at step {step}: {evals[-1]['cos']:.4f} "
            f"(start {evals[0]['cos']:.4f})")
    save(step)
    dist.barrier()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    images_per_s = train_images / train_t if train_t > 0 else 0.0
    if dist.main:
        extra = {"theia_ros_distill": {
            "teachers": {s.model_id: {"name": s.name, "mode": mode, "cache": dirs[s.model_id]} for s in specs},
            "init": cfg.init, "from_scratch": cfg.from_scratch, "step": step, "steps": steps,
            "global_batch": global_batch, "lr": lr, "dataset": dataset, "train_images": len(train_idx),
            "held_out_images": len(held_idx), "feature_stats": STATS_FILE,
            "held_out_cosine": evals[-1]["cos"] if evals else None,
            "targets_normalised": "per teacher, per channel: (x - mean) / std, see " + STATS_FILE}}
        write_published(model, out, extra)
        write_feature_stats(out, {t: stats[t] for t in teacher_ids})
        if cfg.plot and history:
            plot_history(history, evals, teacher_ids, out / "losses.png")
        summary = {"step": step, "steps": steps, "train_images": len(train_idx), "held_out_images": len(held_idx),
                   "images_per_s": images_per_s, "teacher_forward_calls": calls, "evals": evals,
                   "final_loss": history[-1]["loss"] if history else None}
        (out / "distill_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"distill: wrote {out / 'model.safetensors'} (step {step} of {steps}"
            f"{', stopped early' if step < steps else ''})")
    dist.barrier()
    return DistillResult(out, cache.dir, step, steps, history, evals, calls, images_seen, len(train_idx),
                         len(held_idx), model, stats, lr, global_batch, images_per_s,
                         time.perf_counter() - t_start)
