"""Start the theia_encoder lifecycle node alone (autostarts unless autostart:=false).

    ros2 launch theia_ros theia_encoder.launch.py params_file:=my_encoder.yaml model:=/path/to/ckpt

The YAML's theia_encoder section, the arguments applied by the rules of
theia_ros.nodes.graph_description (as theia_graph.launch.py and `theia-ros bringup` apply theirs).
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode

from theia_ros.nodes.graph_description import (
    ENCODER_ARGUMENTS,
    NODES_BY_SECTION,
    PACKAGE,
    graph_params,
    launch_overrides,
    load_params,
    write_params,
)

ENCODER = NODES_BY_SECTION["theia_encoder"]


def _encoder(context):
    arguments = {name: LaunchConfiguration(name).perform(context) for name in ENCODER_ARGUMENTS}
    overrides = launch_overrides(arguments)
    autostart = LaunchConfiguration("autostart").perform(context).lower() in ("1", "true", "yes")
    overrides.setdefault(ENCODER.section, {})["autostart"] = autostart
    params = graph_params(load_params(LaunchConfiguration("params_file").perform(context)), overrides)
    merged = write_params({ENCODER.section: params[ENCODER.section]}, prefix="theia_ros_launch_")
    return [LifecycleNode(package=PACKAGE, executable=ENCODER.executable, name=ENCODER.section, namespace="",
                          parameters=[merged], output="screen")]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "theia_encoder.yaml"),
                              description="theia_encoder parameters YAML"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate without a lifecycle manager"),
        *[DeclareLaunchArgument(name, default_value="", description=f"override the {name} parameter (empty: the "
                                "YAML's)") for name in ENCODER_ARGUMENTS],
        # Large images need a bigger Fast DDS shared-memory segment than the default 512 KB.
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE",
                               os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE")
                               or os.path.join(share, "config", "fastdds.xml")),
        OpaqueFunction(function=_encoder),
    ])
