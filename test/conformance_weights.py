"""Deterministic random Theia checkpoints in the published layout, written from a key list alone.

    python test/conformance_weights.py VARIANT_OR_KEYS_TSV OUT_DIR [--seed N]

The key lists in ``test/data/conformance/keys_<variant>.tsv`` name every tensor of a published
checkpoint (key, shape AxBxC, dtype) in the reference implementation's order. OUT_DIR receives
``config.json`` and ``model.safetensors`` as the published checkpoints lay them out: the config is
derived from the key list (teachers in the order of their heads, each teacher's [C, H, W] from its
head's last layers) and the file name (backbone size).

Values, fixed by the golden outputs in ``test/data/conformance`` (made on such a checkpoint with
seed 2024): the tensor at position i of the key list is drawn from its own generator,
``numpy.random.default_rng([seed, i]).standard_normal(shape)`` (float64), scaled as
``0.02 * x`` except the scales of normalisation layers (a 1-D ``...layernorm*.weight`` of the
backbone and the 3-D ``.weight`` of the heads' LayerNorms over [C, H, W]), which are ``1 + 0.1 * x``;
then cast to the listed dtype. A tensor therefore depends only on the seed and its position.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

CONFORMANCE_DIR = Path(__file__).resolve().parent / "data" / "conformance"
HEADS = "translator.translator_heads."


def keys_file(variant_or_path) -> Path:
    """The key list of a variant name ('theia-tiny-patch16-224-cddsv') or a path to one."""
    path = Path(variant_or_path)
    if path.suffix == ".tsv":
        return path
    return CONFORMANCE_DIR / f"keys_{variant_or_path}.tsv"


def variant_of(keys_path: Path) -> str:
    name = Path(keys_path).name
    if not (name.startswith("keys_") and name.endswith(".tsv")):
        raise ValueError(f"{keys_path}: expected a file named keys_<variant>.tsv")
    return name[len("keys_"):-len(".tsv")]


def read_keys(keys_path) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, dtype) of each line of a key list, in its order (comments and the header skipped)."""
    rows = []
    for line in Path(keys_path).read_text().splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(n) for n in shape.split("x")), dtype))
    return rows


def is_norm_scale(key: str, shape: tuple[int, ...]) -> bool:
    """The scale of a normalisation layer: drawn around 1, not around 0."""
    if not key.endswith(".weight"):
        return False
    return len(shape) == 3 or (len(shape) == 1 and "layernorm" in key)


def tensor_value(key: str, shape: tuple[int, ...], dtype: str, seed: int, index: int) -> np.ndarray:
    draw = np.random.default_rng([seed, index]).standard_normal(shape)
    scaled = 1.0 + 0.1 * draw if is_norm_scale(key, shape) else 0.02 * draw
    return scaled.astype(np.dtype(dtype))


def teacher_sizes(rows) -> dict[str, list[int]]:
    """teacher id -> [C, H, W], in the order the key list gives the heads."""
    shapes = {key: shape for key, shape, _ in rows}
    sizes = {}
    for key, _, _ in rows:
        if key.startswith(HEADS) and key.endswith(".adapter.8.bias"):
            teacher = key[len(HEADS):-len(".adapter.8.bias")]
            channels = shapes[key][0]
            _, height, width = shapes[f"{HEADS}{teacher}.adapter.6.weight"]
            sizes[teacher] = [channels, height, width]
    return sizes


def checkpoint_config(variant: str, rows) -> dict:
    """config.json of a published checkpoint of `variant`, with this key list's teachers."""
    m = re.fullmatch(r"theia-(tiny|small|base)-patch16-224-\w+", variant)
    if not m:
        raise ValueError(f"not a Theia variant name: {variant!r}")
    return {
        "architectures": ["TheiaModel"],
        "auto_map": {"AutoConfig": "theia_model.TheiaConfig", "AutoModel": "theia_model.TheiaModel"},
        "backbone": f"facebook/deit-{m.group(1)}-patch16-224",
        "pretrained": False,
        "image_size": 224,
        "translator_type": "lconv",
        "translator_hidden_size_factor": 1.0,
        "target_feature_sizes": teacher_sizes(rows),
        "target_loss_weights": None,
        "feature_reduce_method": None,
        "num_reg_tokens": 0,
        "feature_neck": False,
        "feature_neck_hidden_dim": 256,
        "feature_neck_nonlinearity": "relu",
        "forward_neck": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
    }


def write_checkpoint(variant_or_keys, out_dir, seed: int = 0) -> Path:
    """Write config.json + model.safetensors of a deterministic random checkpoint into `out_dir`."""
    from safetensors.numpy import save_file

    keys_path = keys_file(variant_or_keys)
    rows = read_keys(keys_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor_value(key, shape, dtype, int(seed), i) for i, (key, shape, dtype) in enumerate(rows)}
    config = checkpoint_config(variant_of(keys_path), rows)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keys", help="a variant name (its key list in test/data/conformance) or a keys_*.tsv file")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_checkpoint(args.keys, args.out, args.seed)
    print(f"{out}: seed {args.seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
