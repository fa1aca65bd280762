"""A picture of patch tokens: their first three principal components as RGB (debug image)."""
import numpy as np


def tokens_to_rgb(tokens, grid=14, scale=16):
    """tokens [rows*cols, C] -> uint8 RGB [rows*scale, cols*scale, 3]; PCA over the tokens. `grid`: rows = cols,
    or (rows, cols)."""
    rows, cols = (grid, grid) if np.isscalar(grid) else (int(grid[0]), int(grid[1]))
    tokens = np.asarray(tokens, dtype=np.float32)
    if tokens.ndim != 2 or tokens.shape[0] != rows * cols:
        raise ValueError(f"expected tokens [{rows * cols}, C], got {list(tokens.shape)}")
    centred = tokens - tokens.mean(axis=0, keepdims=True)
    # The top right-singular vectors are the principal directions; 196 x C is cheap for SVD.
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = centred @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    rgb = np.clip((comps - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    img = (rgb * 255).astype(np.uint8).reshape(rows, cols, 3)
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
