"""Launch files and YAML configs name real executables and declared parameters.

`launch`/`launch_ros` are not installable here, so the launch files are checked statically; the
parameter names they and the YAML files use are checked against the nodes' own declarations.
"""
import ast
import importlib
import re
from pathlib import Path

import pytest
import rclpy
import yaml
from rclpy.context import Context

from theia_ros.nodes.parameters import markdown_table

ROOT = Path(__file__).resolve().parents[1]


# node -> (module, its parameter table): the one place each node's parameters and defaults are written
NODE_TABLES = {
    "theia_encoder": ("theia_ros.nodes.theia_encoder", "ENCODER_PARAMETERS"),
    "theia_policy": ("theia_ros.nodes.theia_policy", "POLICY_PARAMETERS"),
    "synthetic_camera": ("theia_ros.nodes.synthetic_camera", "SYNTHETIC_CAMERA_PARAMETERS"),
    "theia_sim": ("theia_ros.nodes.theia_sim", "SIM_PARAMETERS"),
}
NODE_CLASSES = {"theia_encoder": "TheiaEncoderNode", "theia_policy": "TheiaPolicyNode",
                "synthetic_camera": "SyntheticCamera", "theia_sim": "TheiaSimNode"}


def table(node):
    module, name = NODE_TABLES[node]
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def declared():
    """node -> {parameter: (description, value)} as the running node declares them (its defaults)."""
    context = Context()
    rclpy.init(context=context)
    found = {}
    try:
        for key, (module, _) in NODE_TABLES.items():
            node = getattr(importlib.import_module(module), NODE_CLASSES[key])(context=context)
            names = node.list_parameters([], 0).names
            found[key] = {name: (node.describe_parameter(name).description, node.get_parameter(name).value)
                          for name in names}
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    return found


def test_nodes_declare_their_tables(declared):
    """What a node declares is its table: the same names and the same defaults."""
    for node in NODE_TABLES:
        rows = {p.name: p.default for p in table(node)}
        assert not set(rows) - set(declared[node]), (node, set(rows) - set(declared[node]))
        live = {name: declared[node][name][1] for name in rows}
        if node == "theia_sim":  # the simulator moves `seed` on at start-up: plain resets walk through seeds
            assert live["seed"] == rows["seed"] + 1
            live["seed"] = rows["seed"]
        assert live == rows, node


def test_readme_parameter_tables_match_the_declarations():
    """The README's parameter tables are the declarations (names, defaults, descriptions), row for row."""
    readme = (ROOT / "README.md").read_text()
    for node in NODE_TABLES:
        expected = markdown_table(table(node))
        assert expected in readme, f"README's {node} parameter table differs from the node's; it should be:\n{expected}"


def test_default_config_states_the_declared_defaults():
    """config/theia_encoder.yaml documents the encoder's defaults: each value is the declared one."""
    data = yaml.safe_load((ROOT / "config" / "theia_encoder.yaml").read_text())["theia_encoder"]["ros__parameters"]
    defaults = {p.name: p.default for p in table("theia_encoder")}
    flat = flatten(data)
    assert set(flat) <= set(defaults)
    assert {k: defaults[k] for k in flat} == flat


def test_every_parameter_has_a_description(declared):
    for node, params in declared.items():
        missing = [p for p, (desc, _) in params.items() if not desc and p != "use_sim_time"]
        assert not missing, f"{node}: parameters without a description: {missing}"


def flatten(params, prefix=""):
    """{name: value} as ROS reads a params file: nested mappings are joined with dots."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("config", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_config_yaml_uses_only_declared_parameters(config, declared):
    data = yaml.safe_load(config.read_text())
    for node, section in data.items():
        assert node in declared, f"{config.name}: no node named {node}"
        unknown = set(flatten(section["ros__parameters"])) - set(declared[node])
        assert not unknown, f"{config.name}: {node} does not declare {sorted(unknown)}"


@pytest.mark.parametrize("launch", sorted((ROOT / "launch").glob("*.launch.py")), ids=lambda p: p.name)
def test_launch_files_take_nodes_and_arguments_from_the_graph_description(launch):
    """Executables and argument -> parameter mappings live in theia_ros.nodes.graph_description (checked
    against the scripts, CMakeLists.txt and the nodes' tables in test/test_graph_description.py, which
    also records what each launch file starts); a launch file names none of its own."""
    source = launch.read_text()
    tree = ast.parse(source)
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    assert "from theia_ros.nodes.graph_description import" in source
    assert not re.findall(r'executable="([^"]+)"', source), "an executable named outside the graph description"
