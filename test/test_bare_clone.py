"""The test suite on a bare clone: everything it needs is in the repository, wherever the clone lives."""
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from conformance_weights import CONFORMANCE_DIR, keys_file, read_keys

from theia_ros.encoder.config import VARIANTS

from ros_helpers import NodeProcess, log_prefix

ROOT = Path(__file__).resolve().parents[1]


def test_a_node_script_under_a_path_with_dots_logs_into_the_temporary_directory(tmp_path):
    script = tmp_path / "home" / "j.doe" / "ws.1" / "theia_ros" / "test" / "relay.node.py"
    script.parent.mkdir(parents=True)
    script.write_text("print('relay up', flush=True)\n")
    prefix = log_prefix(str(script))
    assert "/" not in prefix and "." not in prefix and prefix.startswith("relay_node_py")
    with NodeProcess(str(script)) as node:
        deadline = time.monotonic() + 30
        while node.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.proc.returncode == 0 and "relay up" in node.output()
        assert Path(node.log.name).parent == Path(tempfile.gettempdir())
    assert log_prefix("theia_ros.nodes.theia_encoder") == "theia_ros_nodes_theia_encoder_"


def test_no_test_or_module_looks_outside_the_repository_for_data():
    beside = re.compile(r"\.\./shared|THEIA_SHARED_DIR|parents\[2\]\s*/\s*[\"']shared")
    offenders = []
    for path in sorted([*ROOT.glob("test/*.py"), *ROOT.glob("theia_ros/**/*.py"), ROOT / "Makefile"]):
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if beside.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_conformance_data_is_in_the_repository():
    for variant in VARIANTS:  # every published variant's key list, parsed
        rows = read_keys(keys_file(variant))
        total = int(keys_file(variant).read_text().splitlines()[0].split()[-2])
        assert sum(int(np.prod(shape)) for _, shape, _ in rows) == total
    with np.load(CONFORMANCE_DIR / "golden_theia-tiny-patch16-224-cddsv.npz") as golden:
        assert golden["input_224"].shape == (2, 224, 224, 3) and golden["forward_feature_224"].shape == (2, 196, 192)
    assert CONFORMANCE_DIR.is_relative_to(ROOT)
