"""The representations the encoder publishes: one place for their names, shapes, the teacher prefix
and the selection of a representation from the backbone's tokens.

C is the model width (192 tiny, 384 small, 768 base); the patch grid is 14x14 at 224x224 and
(H // 16, W // 16) for an input of H x W (preprocess.patch_grid): N below is its rows x columns.
``teacher:<teacher id>`` names a translator head's prediction of that teacher's features.
"""
from __future__ import annotations

from typing import Tuple, Union

Grid = Union[int, Tuple[int, int]]

#: name -> what it holds (per camera, per image)
REPRESENTATIONS = {
    "tokens": "[196, C] patch tokens without CLS, 14x14 grid row-major ([N, C] on other grids)",
    "cls": "[C] CLS token",
    "mean": "[C] mean-pooled patch tokens",
    "max": "[C] max-pooled patch tokens",
    "all_tokens": "[197, C] CLS token followed by the 196 patch tokens ([1 + N, C] on other grids)",
    "spatial": "[C, 14, 14] patch tokens as a map ([C, rows, columns] on other grids)",
}
TEACHER_PREFIX = "teacher:"


def check_representation(representation: str) -> None:
    """ValueError unless ``representation`` is one of :data:`REPRESENTATIONS`."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {representation!r}; choose from {', '.join(REPRESENTATIONS)}")


def grid_shape(grid: Grid) -> Tuple[int, int]:
    """(rows, columns) of a patch grid given as one int (square) or a pair."""
    if isinstance(grid, int):
        return (grid, grid)
    rows, columns = grid
    return (int(rows), int(columns))


def select_representation(tokens, representation: str, grid: Grid = 14):
    """The backbone's tokens ``[B, 1 + rows*columns, C]`` (CLS first, torch) -> ``representation``:
    the one place every engine (the model, the lean graph, exported graphs) pools or reshapes.
    ``grid``: the patch grid, an int (square) or (rows, columns)."""
    if representation == "all_tokens":
        return tokens
    if representation == "cls":
        return tokens[:, 0]
    patches = tokens[:, 1:]
    if representation == "tokens":
        return patches
    if representation == "mean":
        return patches.mean(dim=1)
    if representation == "max":
        return patches.amax(dim=1)
    if representation == "spatial":
        return patches.transpose(1, 2).unflatten(2, grid_shape(grid))
    check_representation(representation)
    raise AssertionError(f"REPRESENTATIONS lists {representation!r} but nothing selects it")


def is_teacher(representation: str) -> bool:
    return representation.startswith(TEACHER_PREFIX)


def teacher_of(representation: str) -> str:
    """The teacher id (or alias) of ``teacher:<id>``."""
    return representation[len(TEACHER_PREFIX):]


def feature_shape_for(representation: str, dim: int, grid: Grid = 14) -> tuple[int, ...]:
    """Per-image feature shape of ``representation`` for a model of width ``dim`` on a patch grid
    ``grid`` (an int for a square grid, or (rows, columns): preprocess.patch_grid)."""
    rows, columns = grid_shape(grid)
    shapes = {
        "tokens": (rows * columns, dim),
        "all_tokens": (rows * columns + 1, dim),
        "spatial": (dim, rows, columns),
        "cls": (dim,),
        "mean": (dim,),
        "max": (dim,),
    }
    if representation not in shapes:
        raise ValueError(f"no standard shape for representation {representation!r}; known: {sorted(shapes)}")
    return shapes[representation]
