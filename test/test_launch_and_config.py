"""Launch files and YAML configs name real executables and declared parameters.

`launch`/`launch_ros` are not installable here, so the launch files are checked statically; the
parameter names they and the YAML files use are checked against the nodes' own declarations.
"""
import ast
import re
from pathlib import Path

import pytest
import rclpy
import yaml
from rclpy.context import Context

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def declared():
    from theia_ros.nodes.theia_encoder import TheiaEncoderNode
    from theia_ros.nodes.theia_policy import TheiaPolicyNode
    from theia_ros.nodes.theia_sim import TheiaSimNode
    from theia_ros.nodes.synthetic_camera import SyntheticCamera

    context = Context()
    rclpy.init(context=context)
    names = {}
    try:
        for key, cls in (("theia_encoder", TheiaEncoderNode), ("theia_policy", TheiaPolicyNode),
                         ("synthetic_camera", SyntheticCamera), ("theia_sim", TheiaSimNode)):
            node = cls(context=context)
            names[key] = {name: node.describe_parameter(name).description for name in node._parameters}
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    return names


def test_every_parameter_has_a_description(declared):
    for node, params in declared.items():
        missing = [p for p, desc in params.items() if not desc and p != "use_sim_time"]
        assert not missing, f"{node}: parameters without a description: {missing}"


def ros_parameter_names(params, prefix=""):
    """Parameter names as ROS reads a params file: nested mappings are joined with dots."""
    names = set()
    for key, value in params.items():
        if isinstance(value, dict):
            names |= ros_parameter_names(value, f"{prefix}{key}.")
        else:
            names.add(f"{prefix}{key}")
    return names


@pytest.mark.parametrize("config", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_config_yaml_uses_only_declared_parameters(config, declared):
    data = yaml.safe_load(config.read_text())
    for node, section in data.items():
        assert node in declared, f"{config.name}: no node named {node}"
        unknown = ros_parameter_names(section["ros__parameters"]) - set(declared[node])
        assert not unknown, f"{config.name}: {node} does not declare {sorted(unknown)}"


@pytest.mark.parametrize("launch", sorted((ROOT / "launch").glob("*.launch.py")), ids=lambda p: p.name)
def test_launch_files_name_installed_executables_and_declared_parameters(launch, declared):
    source = launch.read_text()
    tree = ast.parse(source)
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    executables = set(re.findall(r'executable="([^"]+)"', source))
    assert executables, "no node started"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for exe in executables:
        assert (ROOT / "scripts" / exe).is_file() and f"scripts/{exe}" in cmake, exe
    for const in ("OVERRIDES", "ENCODER_OVERRIDES", "POLICY_OVERRIDES"):
        match = re.search(rf"^{const} = \(([^)]*)\)", source, re.M)
        if match:
            names = ast.literal_eval(f"({match.group(1)})")
            node = "theia_policy" if const.startswith("POLICY") else "theia_encoder"
            assert set(names) <= set(declared[node]), (const, set(names) - set(declared[node]))
