"""The node processes of one bring-up: each section of a ROS parameters YAML started as its own process
with `--ros-args --params-file`, stopped in data-flow order. Which node each section starts, and how
overrides apply, is nodes/graph_description.py's, shared with the launch files."""
import os
import signal
import subprocess
import sys

from theia_ros.nodes import graph_description
from theia_ros.nodes.environment import child_environment
from theia_ros.nodes.graph_description import GRAPH_NODES, dump_params, graph_nodes, write_params

__all__ = ["NODE_MODULES", "Graph", "apply_overrides", "dump_params"]

# the module of each node section (one module per node, named after its executable)
NODE_MODULES = {node.section: node.module for node in GRAPH_NODES}


def apply_overrides(params, overrides):
    """`node.param=value` strings applied to a parameters mapping (in place; returned), by the rules of
    graph_description (values read as YAML; a `policy` override drops the YAML's policy_params and
    policy_checkpoint when it names another policy)."""
    return graph_description.apply_overrides(params, graph_description.parse_overrides(overrides))


class Graph:
    """The node processes of one bring-up."""

    def __init__(self, params, extra_env=None):
        self.nodes = graph_nodes(params)  # in data-flow order; unknown sections refused
        self.params = params
        self.path = write_params(params, prefix="theia_ros_bringup_")
        self.env = child_environment(**(extra_env or {}))
        self.procs = {}

    def commands(self):
        """{section: argv} of the processes start() runs, in start order."""
        return {node.section: [sys.executable, "-m", node.module, "--ros-args", "--params-file", self.path]
                for node in self.nodes}

    def start(self):
        for name, argv in self.commands().items():
            self.procs[name] = subprocess.Popen(argv, env=self.env, start_new_session=True)

    def dead(self):
        return {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}

    def stop(self, timeout=10.0):
        """SIGINT each node in data-flow order (camera or simulator, encoder, policy), waiting for each:
        a node then stops while its inputs are already quiet, not in the middle of a frame. A node
        stopped by SIGINT exits 0; one still running after `timeout` is killed (SIGKILL)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.close()
        return {name: p.returncode for name, p in self.procs.items()}

    def close(self):
        """Remove the parameters file (stop() does)."""
        if os.path.exists(self.path):
            os.unlink(self.path)
