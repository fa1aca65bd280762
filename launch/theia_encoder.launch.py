"""Start the theia_encoder lifecycle node (autostarts unless autostart:=false).

    ros2 launch theia_ros theia_encoder.launch.py params_file:=my_encoder.yaml model:=/path/to/ckpt
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

OVERRIDES = ("model", "backend", "precision", "device", "representation")


def _encoder(context):
    overrides = {k: LaunchConfiguration(k).perform(context) for k in OVERRIDES}
    overrides = {k: v for k, v in overrides.items() if v}
    autostart = LaunchConfiguration("autostart").perform(context).lower() in ("1", "true", "yes")
    return [LifecycleNode(
        package="theia_ros", executable="theia_encoder", name="theia_encoder", namespace="",
        parameters=[LaunchConfiguration("params_file").perform(context), overrides, {"autostart": autostart}],
        output="screen")]


def generate_launch_description():
    share = get_package_share_directory("theia_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "theia_encoder.yaml"),
                              description="theia_encoder parameters YAML"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate without a lifecycle manager"),
        *[DeclareLaunchArgument(k, default_value="", description=f"override the {k} parameter")
          for k in OVERRIDES],
        # Large images need a bigger Fast DDS shared-memory segment than the default 512 KB.
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE",
                               os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE")
                               or os.path.join(share, "config", "fastdds.xml")),
        OpaqueFunction(function=_encoder),
    ])
