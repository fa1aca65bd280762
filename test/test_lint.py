"""Lint as a test: ruff (pinned in requirements.txt, rules in ruff.toml) over the package, the tests,
the benchmarks, the launch files and the executables; every `# noqa` says why."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINTED = ["theia_ros", "test", "benchmarks", "launch", "scripts"]


def _ruff():
    exe = Path(sys.executable).with_name("ruff")
    return str(exe) if exe.exists() else shutil.which("ruff")


def test_ruff_finds_nothing():
    ruff = _ruff()
    assert ruff, "ruff is not installed: it is pinned in requirements.txt (make setup installs it)"
    result = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", *LINTED], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


NOQA = re.compile(r"#\s*noqa(?::\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(.*)$")


def _unexplained_noqa(line):
    """True when a `# noqa` on `line` gives no reason after its codes (e.g. `# noqa: E402 (why)`)."""
    match = NOQA.search(line)
    return bool(match) and not re.search(r"[A-Za-z]{3,}", match.group(1))


def test_every_noqa_says_why():
    assert _unexplained_noqa("import x  # noqa: F401") and not _unexplained_noqa("import x  # noqa: F401 (re-export)")
    files = [p for d in LINTED for p in (ROOT / d).rglob("*") if p.is_file() and (p.suffix == ".py" or p.parent.name
                                                                                    == "scripts" and not p.suffix)]
    bare = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if _unexplained_noqa(line)]
    assert not bare, "noqa markers that do not say why:\n" + "\n".join(bare)
