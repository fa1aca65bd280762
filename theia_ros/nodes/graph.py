"""The node processes of one bring-up: each section of a ROS parameters YAML started as its own process
with `--ros-args --params-file`, stopped in data-flow order."""
import os
import signal
import subprocess
import sys
import tempfile

import yaml

from theia_ros.nodes.environment import child_environment

# the executable of each node section: one module per node, named after its executable
NODE_MODULES = {
    "synthetic_camera": "theia_ros.nodes.synthetic_camera",
    "theia_encoder": "theia_ros.nodes.theia_encoder",
    "theia_policy": "theia_ros.nodes.theia_policy",
    "theia_sim": "theia_ros.nodes.theia_sim",
}


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # rcl's YAML parser refuses anchors and aliases
        return True


def dump_params(params, stream=None):
    """A ROS parameters YAML (no anchors/aliases, which rcl refuses)."""
    return yaml.dump(params, stream, Dumper=_NoAliasDumper, sort_keys=False)


def apply_overrides(params, overrides):
    """`node.param=value` strings (value parsed as YAML) applied to a parameters mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        node, dot, name = key.partition(".")
        if not sep or not dot or not node or not name:
            raise ValueError(f"override {item!r}: expected node.parameter=value")
        params.setdefault(node, {}).setdefault("ros__parameters", {})[name] = yaml.safe_load(value)
    return params


class Graph:
    """The node processes of one bring-up."""

    def __init__(self, params, extra_env=None):
        unknown = sorted(set(params) - set(NODE_MODULES))
        if unknown:
            raise ValueError(f"no node to start for sections {unknown}; known: {sorted(NODE_MODULES)}")
        self.params = params
        self.file = tempfile.NamedTemporaryFile("w", prefix="theia_ros_bringup_", suffix=".yaml", delete=False)
        dump_params(params, self.file)
        self.file.close()
        self.env = child_environment(**(extra_env or {}))
        self.procs = {}

    def start(self):
        for name in self.params:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", NODE_MODULES[name], "--ros-args", "--params-file", self.file.name],
                env=self.env, start_new_session=True)

    def dead(self):
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def stop(self, timeout=10.0):
        """SIGINT each node in data-flow order (the YAML's order: camera or simulator, encoder,
        policy), waiting for each: a node then stops while its inputs are already quiet, not in
        the middle of a frame."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        os.unlink(self.file.name)
        return {name: p.returncode for name, p in self.procs.items()}
