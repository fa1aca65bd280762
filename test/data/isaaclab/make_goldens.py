"""Golden Isaac Lab-profile tokens, made with transformers' own ViT (not with theia_ros).

    python test/data/isaaclab/make_goldens.py [OUT.npz]

Run it once with transformers <= 4.44 (position embeddings interpolated with ``scale_factor``) and
once with transformers >= 4.45 (``size``); the file name records which (see README.md here).

What it does, on the conformance checkpoint of theia-tiny (``test/conformance_weights.py``, seed
2024, the one test/data/conformance's goldens use):

1. the backbone part of the checkpoint (``backbone.model.*``, transformers 4.x ViTModel names as the
   published checkpoints store them) is written as a plain ViTModel checkpoint and loaded with
   ``transformers.ViTModel.from_pretrained`` (transformers >= 5 renames the 4.x names itself);
2. two photographs, matplotlib's bundled ``grace_hopper.jpg`` and the MRI slice ``s1045.ima.gz``
   (as grey RGB), are decoded with OpenCV and brought to each size with ``cv2.resize(...,
   interpolation=cv2.INTER_AREA)``;
3. Isaac Lab's recipe (isaaclab/envs/mdp/observations.py, ``image_features`` with a theia model):
   ``x.permute(0, 3, 1, 2).float() / 255.0``, ``(x - mean) / std`` with ImageNet's statistics, then
   ``model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:]``.

Stored per size (float32 unless said): a fixed subset of the tokens (all of them when the grid has at
most 64 patches, else the patches on an 8 x 8 lattice of rows and columns that includes the corners)
with every channel; a fingerprint of every token (mean and root mean square over channels) and of
every channel (mean over tokens); the sha256 of the resized uint8 input.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # test/: the conformance checkpoint writer

from conformance_weights import write_checkpoint  # noqa: E402 (after the sys.path insert)

VARIANT = "theia-tiny-patch16-224-cddsv"
SEED = 2024
SIZES = ((224, 224), (480, 640), (128, 128), (100, 150), (96, 128), (720, 1280))
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LATTICE = 8


def photographs() -> np.ndarray:
    """The two source images, RGB uint8, as a list (their sizes differ)."""
    import matplotlib.cbook as cbook

    bgr = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), cv2.IMREAD_COLOR)
    hopper = np.ascontiguousarray(bgr[:, :, ::-1])
    raw = gzip.decompress(Path(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)).read_bytes())
    mri = np.frombuffer(raw, np.uint16).reshape(256, 256).astype(np.float64)
    mri = np.round(255.0 * mri / mri.max()).astype(np.uint8)
    return [hopper, np.ascontiguousarray(np.repeat(mri[:, :, None], 3, axis=2))]


def resized(images, size) -> np.ndarray:
    h, w = size
    return np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) for img in images])


def token_subset(rows: int, columns: int) -> np.ndarray:
    """Indices (row-major) of the stored tokens of a rows x columns grid."""
    if rows * columns <= LATTICE * LATTICE:
        return np.arange(rows * columns)
    r = np.unique(np.round(np.linspace(0, rows - 1, LATTICE)).astype(int))
    c = np.unique(np.round(np.linspace(0, columns - 1, LATTICE)).astype(int))
    return (r[:, None] * columns + c[None, :]).ravel()


def vit_from_conformance_checkpoint(workdir: Path):
    from safetensors.numpy import load_file, save_file
    from transformers import ViTConfig, ViTModel

    ckpt = write_checkpoint(VARIANT, workdir / "theia", SEED)
    tensors = load_file(str(ckpt / "model.safetensors"))
    prefix = "backbone.model."
    backbone = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    config = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                       hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True)
    vit_dir = workdir / "vit"
    vit_dir.mkdir()
    config.save_pretrained(str(vit_dir))
    save_file(backbone, str(vit_dir / "model.safetensors"), metadata={"format": "pt"})
    model, info = ViTModel.from_pretrained(str(vit_dir), add_pooling_layer=False, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"loading the backbone into ViTModel did not match every key: {problems}")
    loaded = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if len(loaded) != len(backbone):  # every tensor of the checkpoint, and nothing else
        raise SystemExit(f"ViTModel has {len(loaded)} tensors, the backbone {len(backbone)}")
    return model.eval()


def isaaclab_tokens(model, images_uint8: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        return model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 1:].numpy()


def main(argv=None) -> int:
    import transformers

    argv = sys.argv[1:] if argv is None else argv
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    convention = "scale_factor" if (major, minor) <= (4, 44) else "size"
    out = Path(argv[0]) if argv else HERE / f"golden_{convention}.npz"
    torch.manual_seed(0)
    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = vit_from_conformance_checkpoint(Path(tmp))
        sources = photographs()
        for h, w in SIZES:
            images = resized(sources, (h, w))
            tokens = isaaclab_tokens(model, images).astype(np.float32)
            rows, columns = h // 16, w // 16
            assert tokens.shape == (len(sources), rows * columns, 192), tokens.shape
            index = token_subset(rows, columns)
            tag = f"{h}x{w}"
            arrays[f"{tag}/index"] = index.astype(np.int32)
            arrays[f"{tag}/tokens"] = tokens[:, index]
            arrays[f"{tag}/token_mean"] = tokens.mean(axis=2, dtype=np.float64).astype(np.float32)
            arrays[f"{tag}/token_rms"] = np.sqrt((tokens.astype(np.float64) ** 2).mean(axis=2)).astype(np.float32)
            arrays[f"{tag}/channel_mean"] = tokens.mean(axis=1, dtype=np.float64).astype(np.float32)
            arrays[f"{tag}/input_sha256"] = np.array(hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest())
            print(f"{tag}: tokens {tokens.shape}, stored {len(index)} per image", flush=True)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "opencv": cv2.__version__,
            "numpy": np.__version__, "convention": convention, "variant": VARIANT, "seed": SEED,
            "sizes": [list(s) for s in SIZES], "images": ["grace_hopper.jpg", "s1045.ima.gz"]}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size} bytes): {meta}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
