"""The theia_ros graph from one parameters YAML: one node per section of the YAML (synthetic_camera,
theia_sim, theia_encoder, theia_policy), the nodes and parameters `theia-ros bringup FILE` starts.

    ros2 launch theia_ros theia_graph.launch.py          # config/demo.yaml: synthetic camera, encoder, policy
    ros2 launch theia_ros theia_graph.launch.py params_file:=robot.yaml \
        model:=theaiinstitute/theia-tiny-patch16-224-cddsv policy:=theia_head policy_checkpoint:=/ckpt
    ros2 launch theia_ros theia_graph.launch.py policy:=hold   # another policy: the YAML's policy_params
                                                               # and policy_checkpoint are then dropped
    ros2 launch theia_ros theia_sim.launch.py            # the main job: simulator, encoder, policy

Which node each section starts and how the arguments apply come from theia_ros.nodes.graph_description,
which bringup uses too; the merged parameters go to every node as one params file.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from theia_ros.nodes.graph_description import (
    GRAPH_ARGUMENTS,
    LAUNCH_ARGUMENTS,
    PACKAGE,
    graph_nodes,
    graph_params,
    launch_overrides,
    load_params,
    write_params,
)


def _nodes(context):
    arguments = {name: LaunchConfiguration(name).perform(context) for name in GRAPH_ARGUMENTS}
    params = graph_params(load_params(LaunchConfiguration("params_file").perform(context)),
                          launch_overrides(arguments))
    merged = write_params(params, prefix="theia_ros_launch_")
    actions = []
    for node in graph_nodes(params):
        common = dict(package=PACKAGE, executable=node.executable, name=node.section, parameters=[merged],
                      output="screen")
        actions.append(LifecycleNode(namespace="", **common) if node.lifecycle else Node(**common))
    return actions


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "demo.yaml"),
                              description="parameters YAML: each node section starts its node"),
        *[DeclareLaunchArgument(name, default_value="", description=f"override {LAUNCH_ARGUMENTS[name][0]}'s "
                                f"{LAUNCH_ARGUMENTS[name][1]} (empty: the YAML's)") for name in GRAPH_ARGUMENTS],
        # Large images need a bigger Fast DDS shared-memory segment than the default 512 KB.
        SetEnvironmentVariable("FASTRTPS_DEFAULT_PROFILES_FILE",
                               os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE")
                               or os.path.join(share, "config", "fastdds.xml")),
        OpaqueFunction(function=_nodes),
    ])
