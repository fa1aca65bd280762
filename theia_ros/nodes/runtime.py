"""What every theia_ros node executable shares: the main() lifecycle, logging into ROS, message classes by name."""
import faulthandler
import importlib
import logging
import sys


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


def run_node(node_class, argv=None, *, on_start=None, spin=None, on_exit=None):
    """Start `node_class` on a SingleThreadedExecutor (inference and rendering want the executor's
    own thread) until Ctrl-C or shutdown. A node that cannot be built (bad parameters, missing
    files) logs why and returns 1 before doing anything; a clean stop returns 0."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    from theia_ros.nodes.environment import use_package_fastdds_profile

    faulthandler.enable()  # a crash in native code (DDS, torch, MuJoCo) leaves a Python traceback in the log
    use_package_fastdds_profile()
    rclpy.init(args=argv if argv is not None else sys.argv)
    try:
        node = node_class()
    except Exception as exc:
        rclpy.logging.get_logger(getattr(node_class, "default_name", node_class.__name__)).fatal(
            f"cannot start: {exc}")
        rclpy.try_shutdown()
        return 1
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if on_start is not None:
            on_start(node)
        if spin is not None:
            spin(node, executor)
        else:
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if on_exit is not None:
            on_exit(node)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
