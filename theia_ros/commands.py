"""Command formats: how one action of a policy travels as a ROS message (plain Python, no ROS imports).

:data:`COMMAND_FORMATS` is the one table of formats: the policy node publishes in one of them (its
``command_format`` parameter), the simulator subscribes to them, and train-policy reads recorded
actions from them. Each :class:`CommandFormat` names its message type and default topic and maps an
action to and from a message:

- ``write(msg, values, target, new_message)`` fills an empty message of the format's type with the
  action `values` (floats) for `target` (:class:`CommandTarget`); ``new_message(type_name)`` makes
  an empty nested message (only a trajectory needs one: its point);
- ``read(msg, mode)`` returns ``(joint names or None, values)``: the action a message carries, in the
  message's joint order (None: a bare vector, whose order the receiver knows).

Messages are duck-typed: the functions use field names only, so they work on rclpy messages and on
rosbags-deserialized messages alike. A header stamp is the sender's business (its clock).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

TRAJECTORY_POINT_TYPE = "trajectory_msgs/msg/JointTrajectoryPoint"


@dataclasses.dataclass(frozen=True)
class CommandTarget:
    """What a command says besides its values.

    joint_names: the commanded joints, in action order. mode: "position" or "velocity" (where the
    message has both fields). frame_id: the frame of an end-effector step. time_from_start: seconds
    from receipt to the trajectory point.
    """

    joint_names: tuple[str, ...]
    mode: str = "position"
    frame_id: str = ""
    time_from_start: float = 0.1


@dataclasses.dataclass(frozen=True)
class CommandFormat:
    name: str  # the policy node's command_format value
    message_type: str  # "pkg/msg/Type"
    topic: str  # default topic (relative)
    description: str
    stamped: bool  # has a std_msgs/Header
    write: Callable  # (msg, values, target, new_message) -> msg
    read: Callable  # (msg, mode="position") -> (names | None, float64 values)


def _duration(seconds: float) -> tuple[int, int]:
    return int(seconds), int((seconds % 1) * 1e9)


def time_from_start(point) -> float:
    """time_from_start of a trajectory point in seconds."""
    return point.time_from_start.sec + point.time_from_start.nanosec * 1e-9


# ---- float64_multi_array: the values only (a ros2_control forward_command_controller)

def write_float64_multi_array(msg, values: Sequence[float], target: CommandTarget, new_message=None):
    msg.data = list(values)
    return msg


def read_float64_multi_array(msg, mode: str = "position"):
    return None, np.asarray(msg.data, dtype=np.float64)


# ---- joint_trajectory: one point, reached `time_from_start` after receipt

def write_joint_trajectory(msg, values: Sequence[float], target: CommandTarget, new_message):
    msg.joint_names = list(target.joint_names)
    point = new_message(TRAJECTORY_POINT_TYPE)
    if target.mode == "velocity":
        point.velocities = list(values)
    else:
        point.positions = list(values)
    point.time_from_start.sec, point.time_from_start.nanosec = _duration(target.time_from_start)
    msg.points = [point]
    return msg


def read_joint_trajectory(msg, mode: str = "position"):
    """The first point's positions (or velocities); no values when the trajectory has no point."""
    if not len(msg.points):
        return list(msg.joint_names), np.zeros(0)
    point = msg.points[0]
    return list(msg.joint_names), np.asarray(point.velocities if mode == "velocity" else point.positions,
                                             dtype=np.float64)


def trajectory_points(msg) -> list[tuple[float, list[float]]]:
    """[(time_from_start s, positions)] of every point of a JointTrajectory."""
    return [(time_from_start(point), list(point.positions)) for point in msg.points]


# ---- joint_state: named joints, positions or velocities

def write_joint_state(msg, values: Sequence[float], target: CommandTarget, new_message=None):
    msg.name = list(target.joint_names)
    if target.mode == "velocity":
        msg.velocity = list(values)
    else:
        msg.position = list(values)
    return msg


def read_joint_state(msg, mode: str = "position"):
    return list(msg.name), np.asarray(msg.velocity if mode == "velocity" else msg.position, dtype=np.float64)


# ---- ee_delta_pose: a 6-value end-effector step [dx, dy, dz, droll, dpitch, dyaw] (m, rad, static-axis
# roll-pitch-yaw) in target.frame_id, for a Cartesian controller or servo node

def write_ee_delta_pose(msg, values: Sequence[float], target: CommandTarget, new_message=None):
    from transforms3d.euler import euler2quat

    msg.header.frame_id = target.frame_id
    msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in values[:3])
    w, x, y, z = euler2quat(*values[3:6], axes="sxyz")
    msg.pose.orientation.w, msg.pose.orientation.x = float(w), float(x)
    msg.pose.orientation.y, msg.pose.orientation.z = float(y), float(z)
    return msg


def read_ee_delta_pose(msg, mode: str = "position"):
    from transforms3d.euler import quat2euler

    p, q = msg.pose.position, msg.pose.orientation
    return None, np.array([p.x, p.y, p.z, *quat2euler((q.w, q.x, q.y, q.z), axes="sxyz")], dtype=np.float64)


COMMAND_FORMATS = {f.name: f for f in (
    CommandFormat("float64_multi_array", "std_msgs/msg/Float64MultiArray", "commands",
                  "the action values (a ros2_control forward_command_controller)", False,
                  write_float64_multi_array, read_float64_multi_array),
    CommandFormat("joint_trajectory", "trajectory_msgs/msg/JointTrajectory", "joint_trajectory",
                  "named joints, one point (positions, or velocities in velocity mode)", True,
                  write_joint_trajectory, read_joint_trajectory),
    CommandFormat("joint_state", "sensor_msgs/msg/JointState", "joint_command",
                  "named joints, positions (or velocities in velocity mode)", True,
                  write_joint_state, read_joint_state),
    CommandFormat("ee_delta_pose", "geometry_msgs/msg/PoseStamped", "ee_delta",
                  "a 6-value end-effector step [dx, dy, dz, droll, dpitch, dyaw] (m, rad, static-axis "
                  "roll-pitch-yaw) in the frame ee_frame", True, write_ee_delta_pose, read_ee_delta_pose),
)}
EE_DELTA_DIM = 6  # values of an ee_delta_pose action
