#!/usr/bin/env python3
"""Run every benchmark in this folder, one after the other (`make bench`).

Each prints its own markdown table with medians, ratios measured in the same run, and its
budgets. The machine is shared and noisy: compare ratios, not absolute times across runs.
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n# {script.name}\n", flush=True)
        if subprocess.run([sys.executable, str(script)]).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"\nbenchmarks that exited non-zero: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
