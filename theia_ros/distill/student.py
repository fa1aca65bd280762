"""The student: a Theia encoder (``TheiaModel``) with one translator head per teacher; its loss;
writing it in the published checkpoint layout that :func:`theia_ros.encoder.model.load_model` reads.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from theia_ros.encoder.checkpoint import checkpoint_key_order, head_module_name, module_key_to_checkpoint_key
from theia_ros.encoder.config import BACKBONES, TheiaConfig, variant_config
from theia_ros.encoder.model import TheiaModel, load_model

__all__ = [
    "COS_WEIGHT",
    "L1_WEIGHT",
    "STATS_FILE",
    "build_student",
    "resolve_backbone",
    "distill_loss",
    "map_cosine",
    "write_published",
    "write_feature_stats",
    "load_feature_stats",
    "denormalise",
]

COS_WEIGHT = 0.9
L1_WEIGHT = 0.1
STATS_FILE = "target_feature_stats.safetensors"


def resolve_backbone(name: str) -> str:
    """A backbone id from a variant ('theia-tiny-patch16-224-cddsv', 'random:...'), a backbone id
    ('facebook/deit-tiny-patch16-224') or a size ('tiny', 'small', 'base')."""
    text = name[len("random:"):] if name.startswith("random:") else name
    if text in BACKBONES:
        return text
    if text in ("tiny", "small", "base"):
        return f"facebook/deit-{text}-patch16-224"
    m = re.fullmatch(r"theia-(tiny|small|base)-patch16-224(-\w+)?", text)
    if m:
        return f"facebook/deit-{m.group(1)}-patch16-224"
    raise ValueError(f"unknown backbone {name!r}: give a Theia variant (theia-tiny-patch16-224-cdiv), "
                     f"a backbone ({', '.join(BACKBONES)}) or a size (tiny, small, base)")


def build_student(targets: Mapping[str, Tuple[int, int, int]], *, init: Optional[str] = None,
                  from_scratch: Optional[str] = None, seed: int = 0) -> Tuple[TheiaModel, dict]:
    """A trainable student (fp32, CPU, train mode) with one head per teacher id in ``targets``.

    ``init``: a checkpoint for :func:`load_model` (directory, hub id, ``random:<variant>``): the
    backbone is copied, and so is every head whose teacher id and target size match; the other
    heads start from fresh initialisation. ``from_scratch``: a variant / backbone / size whose
    backbone starts from transformers' ViT initialisation (seeded by ``seed``).
    Returns (model, info) with ``info`` saying what was copied.
    """
    if (init is None) == (from_scratch is None):
        raise ValueError("give exactly one of init (a checkpoint to fine-tune) or from_scratch (a variant)")
    base = None
    if init is not None:
        base = load_model(init, seed=seed if str(init).startswith("random:") else None)
        backbone, factor = base.config.backbone, base.config.translator_hidden_size_factor
    else:
        backbone, factor = resolve_backbone(from_scratch), 1.0
    config = TheiaConfig.from_dict({"backbone": backbone, "translator_hidden_size_factor": factor,
                                    "target_feature_sizes": {t: list(s) for t, s in targets.items()}},
                                   where="distillation targets")
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = TheiaModel(config, model_id="distill", weights_id="distill")
    info = {"init": init, "from_scratch": from_scratch, "backbone": backbone, "heads_copied": [], "heads_new": []}
    if base is not None:
        model.backbone.load_state_dict(base.backbone.state_dict(), strict=True)
        for teacher, target in targets.items():
            if teacher in base.target_feature_sizes and tuple(base.target_feature_sizes[teacher]) == tuple(target):
                model.heads[head_module_name(teacher)].load_state_dict(
                    base.heads[head_module_name(teacher)].state_dict(), strict=True)
                info["heads_copied"].append(teacher)
            else:
                info["heads_new"].append(teacher)
        info["init_weights_id"] = base.weights_id
    else:
        info["heads_new"] = list(targets)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model, info


def map_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image cosine similarity of whole flattened maps: [B, ...] x [B, ...] -> [B]."""
    return F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1, eps=1e-8)


def distill_loss(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]):
    """Theia's loss: per teacher 0.9 x cosine-embedding loss on the flattened maps + 0.1 x SmoothL1
    (beta 1, mean), averaged over teachers. Predictions and targets are [B, H*W, C].

    Returns (total, [(loss, cos_loss, l1_loss) per teacher]) (all 0-dim tensors)."""
    parts = []
    for pred, target in zip(preds, targets):
        pred = pred.float()
        cos = (1.0 - map_cosine(pred, target)).mean()
        l1 = F.smooth_l1_loss(pred, target)
        parts.append((COS_WEIGHT * cos + L1_WEIGHT * l1, cos, l1))
    total = torch.stack([p[0] for p in parts]).mean()
    return total, parts


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_published(model: TheiaModel, out_dir, extra: Optional[dict] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (fp32, published key names and order) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {module_key_to_checkpoint_key(k, cfg.teachers): v for k, v in model.state_dict().items()}
    order = checkpoint_key_order(cfg)
    if set(order) != set(state):
        raise AssertionError(f"key mismatch writing the checkpoint: {sorted(set(order) ^ set(state))[:8]}")
    tensors = {k: state[k].detach().to(device="cpu", dtype=torch.float32).contiguous() for k in order}
    tmp = out / f".model.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    size = cfg.backbone.split("/")[-1].split("-")[1]
    config = variant_config(f"theia-{size}-patch16-224-cdiv")
    config["translator_hidden_size_factor"] = cfg.translator_hidden_size_factor
    config["target_feature_sizes"] = {t: list(s) for t, s in cfg.target_feature_sizes}
    if extra:
        config.update(extra)
    _atomic_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def write_feature_stats(out_dir, stats: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """Per-teacher target statistics next to the checkpoint: keys '<teacher id>.mean' / '.std' [C]."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = {}
    for teacher, (mean, std) in stats.items():
        tensors[f"{teacher}.mean"] = mean.detach().float().cpu().contiguous()
        tensors[f"{teacher}.std"] = std.detach().float().cpu().contiguous()
    path = out / STATS_FILE
    tmp = out / f".{STATS_FILE}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt", "teachers": json.dumps(list(stats))})
    os.replace(tmp, path)
    return path


def load_feature_stats(checkpoint_dir) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{teacher id: (mean [C], std [C])} written by a distillation run ({} when the file is absent)."""
    from safetensors import safe_open

    path = Path(checkpoint_dir) / STATS_FILE
    if not path.is_file():
        return {}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        teachers = json.loads((f.metadata() or {}).get("teachers", "[]"))
        for t in teachers:
            out[t] = (f.get_tensor(f"{t}.mean"), f.get_tensor(f"{t}.std"))
    return out


def denormalise(pred: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A head's prediction [B, H*W, C] (normalised space) -> the teacher's own feature space."""
    return pred * std.to(pred) + mean.to(pred)


class StudentForward(nn.Module):
    """What DDP wraps: pixels -> tuple of head outputs [B, H*W, C] in teacher order."""

    def __init__(self, model: TheiaModel, teachers: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = [head_module_name(t) for t in teachers]

    def forward(self, pixels: torch.Tensor) -> List[torch.Tensor]:
        patches = self.model.encode_pixels(pixels)[:, 1:]
        return [self.model.heads[n](patches) for n in self.names]
