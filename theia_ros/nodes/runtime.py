"""What every theia_ros node executable shares: the main() lifecycle, logging into ROS, message classes by name."""
import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading


def message_class(msgtype: str):
    """The rosidl Python class of a message type name 'pkg/msg/Type' (the names commands.py and bags use)."""
    pkg, _, name = msgtype.partition("/msg/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot import the message class of {msgtype}: {exc}") from exc


class RosLogHandler(logging.Handler):
    """Sends the plain-Python core's log records (e.g. "building tensorrt engine ... takes minutes")
    to a node's ROS logger, so they reach the console and /rosout like the node's own lines."""

    def __init__(self, ros_logger, level=logging.INFO):
        super().__init__(level)
        self.ros_logger = ros_logger

    def emit(self, record):
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                self.ros_logger.error(text)
            elif record.levelno >= logging.WARNING:
                self.ros_logger.warning(text)
            else:
                self.ros_logger.info(text)
        except Exception:  # broad on purpose: logging must never take the node down
            self.handleError(record)


def forward_python_logging(node, name, level=logging.INFO):
    """Route Python logger `name` (and its children) to `node`'s ROS logger, and only there."""
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if isinstance(h, RosLogHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(RosLogHandler(node.get_logger(), level))
    logger.setLevel(level)
    logger.propagate = False  # not twice (Python's last-resort stderr handler)
    return logger


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SPIN_PERIOD = 0.1  # s: the longest a stop request waits while the executor is idle


class StopRequested(BaseException):
    """Raised in the main thread by the first SIGINT or SIGTERM while a node starts or spins. It ends
    whatever runs (a callback, an inference, a configure) at once, so nothing more is computed or
    published; a BaseException, so the nodes' `except Exception` guards do not swallow it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGINT and SIGTERM handling of a node process, instead of rclpy's.

    rclpy's own handlers shut the context down from another thread the moment a signal arrives,
    while the main thread may still be in a callback (publishing then fails: "publisher's context
    is invalid"), and a second Ctrl-C (`ros2 launch` forwards one after the terminal's) interrupts
    the teardown (exit code -2). Here the first signal only raises StopRequested in the main thread
    while `armed`; every later one, and any arriving while not armed, is only counted."""

    def __init__(self):
        self.requested = None  # the first signal received
        self.ignored = 0  # signals after the first
        self.armed = False
        self.running_armed = False  # inside run_armed's function

    def install(self):
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self._default_unraisable = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return self

    def _unraisable(self, unraisable):
        """A stop can land while rclpy builds an object (a Task of the executor): the half-built object
        then fails in its __del__. Expected after a stop, not an error: not printed as a traceback.
        A stop can also land inside a weakref callback or a __del__ (e.g. importlib's module-lock
        callback while a configure imports), where Python drops exceptions: the StopRequested would be
        lost and the configure go on. It is delivered again, so it still ends what runs."""
        if isinstance(unraisable.exc_value, StopRequested) and self.running_armed:
            self.requested, self.armed = None, True
            # sent from another thread a moment later: raised here, inside this hook, it would be dropped too
            threading.Timer(0.005, os.kill, (os.getpid(), unraisable.exc_value.signum)).start()
            return
        owner = getattr(unraisable.object, "__module__", "") or ""
        if self.requested is not None and owner.startswith("rclpy") and isinstance(unraisable.exc_value,
                                                                                   AttributeError):
            return
        self._default_unraisable(unraisable)

    def _handle(self, signum, frame):
        if self.requested is not None:
            self.ignored += 1
            return
        self.requested = signum
        if self.armed:
            self.armed = False  # once: the teardown is never interrupted
            raise StopRequested(signum)

    def ignore(self):
        """Ignore SIGINT and SIGTERM from now on, for the rest of the process: Python's finalization
        puts back the default action (death by the signal) for handlers written in Python, not for
        an ignored signal, and a node's process is done once its teardown is."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def running(self) -> bool:
        """False once a stop was asked for (loops of their own check it, besides StopRequested)."""
        return self.requested is None

    def run_armed(self, function):
        """function() with the first signal raising StopRequested inside it; returns normally when
        it ends (its own exceptions, other than StopRequested, propagate) with signals disarmed."""
        try:
            try:
                if self.requested is None:  # a signal that came before (while importing) stops here
                    self.armed = self.running_armed = True
                    function()
            finally:
                self.armed = self.running_armed = False  # a StopRequested raised right here is caught below
        except StopRequested:
            pass


def node_name(node_class) -> str:
    """The name a node's start-up lines go under before the node exists: its module's (one node per
    module, named after its executable; `python -m` runs it as __main__, whose spec keeps the name)."""
    module = sys.modules.get(node_class.__module__)
    spec = getattr(module, "__spec__", None)
    name = spec.name if spec is not None else node_class.__module__
    return name.rsplit(".", 1)[-1] if name != "__main__" else node_class.__name__


def run_node(node_class, argv=None, *, on_start=None, spin=None, on_shutdown=None, on_exit=None):
    """Start `node_class` on a SingleThreadedExecutor (inference and rendering want the executor's
    own thread) until SIGINT/SIGTERM or an external shutdown, then stop it in order:

    1. the first signal ends the running callback (StopRequested) and no callback runs after it;
       later signals (a second Ctrl-C, launch's SIGTERM) are ignored;
    2. on_shutdown(node): the one place a node may still publish (e.g. a final zero-velocity
       command): the context and publishers are still valid;
    3. the executor is shut down, on_exit(node) releases resources, the node is destroyed and
       rclpy shut down.

    on_start(node) runs before spinning (e.g. autostart); spin(node, executor, running) replaces
    the default spin loop (it must return once running() is False). A node that cannot be built
    (bad parameters, missing files) logs why under its executable's name and returns 1; a stop by
    signal or shutdown returns 0."""
    stop = StopSignals().install()
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    from theia_ros.nodes.environment import use_package_fastdds_profile

    faulthandler.enable()  # a crash in native code (DDS, torch, MuJoCo) leaves a Python traceback in the log
    use_package_fastdds_profile()
    state = {"node": None, "executor": None, "code": 0}

    def start_and_spin():
        rclpy.init(args=argv if argv is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
        try:
            state["node"] = node = node_class()
        except Exception as exc:
            rclpy.logging.get_logger(node_name(node_class)).fatal(f"cannot start: {exc}")
            state["code"] = 1
            return
        state["executor"] = executor = SingleThreadedExecutor()
        executor.add_node(node)
        if on_start is not None:
            on_start(node)
        if spin is not None:
            spin(node, executor, stop.running)
            return
        while stop.running() and rclpy.ok(context=node.context):
            executor.spin_once(timeout_sec=SPIN_PERIOD)

    try:
        stop.run_armed(start_and_spin)
    except ExternalShutdownException:
        pass
    finally:  # signals are disarmed here: a second Ctrl-C cannot interrupt the teardown
        node, executor = state["node"], state["executor"]
        try:
            if node is not None and rclpy.ok(context=node.context):
                if stop.requested is not None:
                    node.get_logger().info(f"stopping ({signal.Signals(stop.requested).name})")
                if on_shutdown is not None:
                    on_shutdown(node)
        finally:  # a failing hook is reported (traceback, exit 1) after the teardown, not instead of it
            try:
                if executor is not None:
                    executor.shutdown()
                if node is not None and on_exit is not None:
                    on_exit(node)
            finally:
                if node is not None:
                    node.destroy_node()
                rclpy.try_shutdown()
                stop.ignore()
    return state["code"]
