"""One way to find a file shipped with theia_ros: in the source tree, else in an installed share/theia_ros.

The share directories searched, in order: the source checkout (this file's grandparent), the
Python prefix (a pip or venv install) and every prefix of AMENT_PREFIX_PATH (a colcon install).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "theia_ros"
PACKAGE_URL = f"package://{PACKAGE}/"
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def share_dirs() -> list[Path]:
    dirs = [SOURCE_ROOT, Path(sys.prefix) / "share" / PACKAGE]
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            dirs.append(Path(prefix) / "share" / PACKAGE)
    return dirs


def find_package_file(relative) -> Path | None:
    """The first existing `<share dir>/<relative>`, or None."""
    for base in share_dirs():
        path = base / relative
        if path.exists():
            return path
    return None


def package_file(relative) -> Path:
    """Like find_package_file, but a missing file is an error that says where it was looked for."""
    path = find_package_file(relative)
    if path is None:
        raise FileNotFoundError(f"{relative} of {PACKAGE} not found in {', '.join(map(str, share_dirs()))}; install "
                                "the package (colcon or pip) or run from the source tree")
    return path


def resolve_package_path(path: str) -> str:
    """`package://theia_ros/<relative>` -> that file's path; any other path unchanged."""
    if not str(path).startswith(PACKAGE_URL):
        return path
    return str(package_file(str(path)[len(PACKAGE_URL):]))
