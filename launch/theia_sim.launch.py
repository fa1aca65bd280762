"""The main job on a robot install: the simulator, the encoder and the shipped policy, in a closed loop
(config/sim_demo.yaml; `theia-ros bringup config/sim_demo.yaml` starts the same nodes).

    ros2 launch theia_ros theia_sim.launch.py
    ros2 launch theia_ros theia_sim.launch.py model:=/path/to/checkpoint policy_checkpoint:=/path/to/policy

theia_graph.launch.py with another default YAML: every argument of theia_graph.launch.py applies.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource

from theia_ros.nodes.graph_description import PACKAGE


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        # declared before theia_graph.launch.py's own params_file: this default wins
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "sim_demo.yaml"),
                              description="parameters YAML: each node section starts its node"),
        IncludeLaunchDescription(PythonLaunchDescriptionSource(os.path.join(share, "launch", "theia_graph.launch.py"))),
    ])
