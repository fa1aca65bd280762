#!/usr/bin/env python3
"""Record the call signatures of the torch-tensorrt API the tensorrt backend uses, read from the
released wheels themselves (no import: TensorRT's libraries and a GPU are not needed).

    python3 scripts/record_trt_signatures.py [VERSION ...]   # default: the versions in VERSIONS

Downloads each ``torch-tensorrt==VERSION`` wheel (cp311, x86_64; the Python sources are the same on
aarch64) with ``pip download --no-deps``, parses ``torch_tensorrt/dynamo/_compiler.py`` and
``torch_tensorrt/_compile.py`` with ``ast`` and writes the parameter names of ``dynamo.compile``,
``save`` and ``load`` to ``test/data/torch_tensorrt_signatures.json``, with the ATen ops the release
can convert to TensorRT layers (``@dynamo_tensorrt_converter`` targets) and the ones its lowering
replaces or removes before conversion (its own decompositions, the assert-removal pass).
test_backends.py checks the backend's arguments against these signatures, and the ops of the graphs
it exports against these op lists, on machines without torch-tensorrt.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# 2.8: JetPack 6.2's release; 2.10: first with rule-based autocast; 2.13: strongly typed only; 2.14: newest
VERSIONS = ["2.8.0", "2.10.0", "2.13.0", "2.14.0"]
PLATFORMS = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_34_x86_64") for arg in ("--platform", tag)]
OUT = Path(__file__).resolve().parent.parent / "test" / "data" / "torch_tensorrt_signatures.json"
FUNCTIONS = {  # name in the JSON: (file in the wheel, top-level function)
    "dynamo.compile": ("torch_tensorrt/dynamo/_compiler.py", "compile"),
    "save": ("torch_tensorrt/_compile.py", "save"),
    "load": ("torch_tensorrt/_compile.py", "load"),
}

CONVERTER = re.compile(r"@dynamo_tensorrt_converter\(\s*((?:torch\.ops\.)?aten\.[\w.]+)")
DECOMPOSITION = re.compile(r"register_torch_trt_decomposition\(\s*((?:torch\.ops\.)?aten\.[\w.]+)")
REMOVED = re.compile(r"node\.target\s*==\s*((?:torch\.ops\.)?aten\.[\w.]+)")


def _ops(pattern, source) -> set:
    return {m.group(1).removeprefix("torch.ops.") for m in pattern.finditer(source)}


def parameters(source: str, function: str) -> dict:
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            a = node.args
            return {"positional": [p.arg for p in a.posonlyargs + a.args],
                    "keyword_only": [p.arg for p in a.kwonlyargs],
                    "var_keyword": a.kwarg is not None}
    raise LookupError(f"no top-level def {function}")


def record(version: str, workdir: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.11", *PLATFORMS, "-d", str(workdir),
                    f"torch-tensorrt=={version}"], check=True, stderr=subprocess.DEVNULL)
    wheel = next(workdir.glob(f"torch_tensorrt-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        entry = {"wheel": wheel.name}
        for name, (path, function) in FUNCTIONS.items():
            entry[name] = parameters(zf.read(path).decode(), function)
        converters, lowered = set(), set()
        for path in zf.namelist():
            if path.startswith("torch_tensorrt/dynamo/conversion/") and path.endswith(".py"):
                converters |= _ops(CONVERTER, zf.read(path).decode())
            elif path == "torch_tensorrt/dynamo/lowering/_decompositions.py":
                lowered |= _ops(DECOMPOSITION, zf.read(path).decode())
            elif path == "torch_tensorrt/dynamo/lowering/passes/remove_assert_nodes.py":
                lowered |= _ops(REMOVED, zf.read(path).decode())
        entry["converted_ops"] = sorted(converters)
        entry["lowered_ops"] = sorted(lowered)
    return entry


def main(argv: list[str]) -> int:
    versions = argv or VERSIONS
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for version in versions:
            data[version] = record(version, Path(tmp))
            entry = data[version]
            print(f"torch-tensorrt {version}: dynamo.compile has {len(entry['dynamo.compile']['keyword_only'])} "
                  f"keyword-only parameters; {len(entry['converted_ops'])} converted ops, "
                  f"{len(entry['lowered_ops'])} lowered")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
