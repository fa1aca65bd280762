"""Encoder + policy (and optionally the synthetic camera), from one parameters YAML.

    ros2 launch theia_ros theia_graph.launch.py params_file:=robot.yaml \
        model:=theaiinstitute/theia-tiny-patch16-224-cddsv policy:=theia_head policy_checkpoint:=/ckpt
    ros2 launch theia_ros theia_graph.launch.py synthetic_camera:=true   # the demo defaults

`theia-ros bringup robot.yaml` starts the same nodes from the same YAML where `ros2 launch` is
not installed.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

ENCODER_OVERRIDES = ("model", "backend", "precision", "device")
POLICY_OVERRIDES = ("policy", "policy_checkpoint")


def _nodes(context):
    def value(name):
        return LaunchConfiguration(name).perform(context)

    params_file = value("params_file")
    encoder = {k: value(k) for k in ENCODER_OVERRIDES if value(k)}
    policy = {k: value(k) for k in POLICY_OVERRIDES if value(k)}
    nodes = [
        LifecycleNode(package="theia_ros", executable="theia_encoder", name="theia_encoder", namespace="",
                      parameters=[params_file, encoder], output="screen"),
        Node(package="theia_ros", executable="theia_policy", name="theia_policy",
             parameters=[params_file, policy], output="screen"),
    ]
    if value("synthetic_camera").lower() in ("1", "true", "yes"):
        nodes.append(Node(package="theia_ros", executable="synthetic_camera", name="synthetic_camera",
                          parameters=[params_file], output="screen"))
    return nodes


def generate_launch_description():
    share = get_package_share_directory("theia_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "demo.yaml"),
                              description="parameters YAML with theia_encoder / theia_policy sections"),
        DeclareLaunchArgument("synthetic_camera", default_value="false",
                              description="also start the synthetic camera (demo without a camera)"),
        *[DeclareLaunchArgument(k, default_value="", description=f"override the encoder's {k}")
          for k in ENCODER_OVERRIDES],
        *[DeclareLaunchArgument(k, default_value="", description=f"override the policy node's {k}")
          for k in POLICY_OVERRIDES],
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE",
                               os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE")
                               or os.path.join(share, "config", "fastdds.xml")),
        OpaqueFunction(function=_nodes),
    ])
