"""Helpers for tests that run real ROS 2 nodes in separate processes and talk to them over DDS."""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import rclpy
import yaml
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from theia_ros.nodes.environment import child_environment

RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)


def log_prefix(name):
    """A temporary file name prefix for a node's module or script path: its last part, only [A-Za-z0-9_-],
    so the file lands in the temporary directory wherever the clone lives (dots or not in its path)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(str(name)) or "node") + "_"


class NodeProcess:
    """A node started as `python -m MODULE ARGS` (or `python SCRIPT.py ARGS`) in its own process.

    Its output goes to a file, read with output(). stop() sends SIGINT, as Ctrl-C would.
    """

    def __init__(self, module, *args, env=None, name=None):
        self.name = name or module
        self.log = tempfile.NamedTemporaryFile(prefix=log_prefix(self.name), suffix=".log", delete=False)
        target = [module] if module.endswith(".py") else ["-m", module]
        cmd = [sys.executable, *target, *[str(a) for a in args]]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=child_environment(**(env or {})), start_new_session=True)

    def output(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10.0):
        """SIGINT (what Ctrl-C sends), then SIGKILL if it does not end; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        os.unlink(self.log.name) if exc[0] is None else None


class RosTestClient:
    """One rclpy node in the test process, spun on a background thread."""

    def __init__(self, name):
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while not self._stop and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def collect(self, msg_type, topic, qos=RELIABLE):
        """Subscribe to `topic`; returns the (growing) list of (receive time, message)."""
        received = []

        def callback(msg):
            with self.lock:
                received.append((time.monotonic(), msg))

        sub = self.node.create_subscription(msg_type, topic, callback, qos)
        return received, sub

    def publisher(self, msg_type, topic, qos=RELIABLE):
        return self.node.create_publisher(msg_type, topic, qos)

    def wait_for_subscribers(self, publisher, count=1, timeout=20.0):
        return wait_until(lambda: publisher.get_subscription_count() >= count, timeout)

    def wait_for_publishers(self, topic, count=1, timeout=20.0):
        return wait_until(lambda: self.node.count_publishers(topic) >= count, timeout)

    def destroy(self, entity):
        if hasattr(entity, "topic_name") and hasattr(entity, "callback"):
            self.node.destroy_subscription(entity)
        else:
            self.node.destroy_publisher(entity)

    def close(self):
        self._stop = True
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def wait_until(predicate, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def params_file(path, node, params):
    """Write a ROS 2 parameters file for node `node` at `path`; returns `path`."""
    path.write_text(yaml.safe_dump({node: {"ros__parameters": params}}))
    return path


def diagnostic_values(diags, name):
    """The key/values of the newest status named `name` in `diags` ((time, DiagnosticArray) pairs), or None."""
    for _, array in reversed(diags):
        for status in array.status:
            if status.name == name:
                return {kv.key: kv.value for kv in status.values}
    return None
