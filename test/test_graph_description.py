"""`ros2 launch` and `theia-ros bringup` start the same graph, from one description (nodes/graph_description.py).

`launch`/`launch_ros` are not installable here: the launch files run against stub modules that
record what they declare and start (DeclareLaunchArgument defaults, OpaqueFunction, included launch
files, Node/LifecycleNode), the way `ros2 launch` executes them; the recorded nodes and their
parameters are compared with the processes bringup's Graph starts, for every shipped YAML.
"""
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import rclpy
import yaml
from rclpy.context import Context

from theia_ros.cli.bringup import bringup_params
from theia_ros.nodes.environment import child_environment
from theia_ros.nodes.graph import Graph
from theia_ros.nodes.graph_description import (
    CHECKPOINT_CONFIG,
    DEFAULT_POLICY,
    ENCODER_ARGUMENTS,
    GRAPH_ARGUMENTS,
    GRAPH_NODES,
    LAUNCH_ARGUMENTS,
    dump_params,
    parse_value,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("demo.yaml", "sim_demo.yaml", "theia_encoder.yaml")
POLICIES = ("hold", "mlp", "theia_head")
# what a `policy` override keeps of the YAML's policy_params / policy_checkpoint: only where it names the
# YAML's own policy (demo.yaml's theia_head; sim_demo.yaml's checkpoint holds a theia_head)
KEPT = {("demo.yaml", "theia_head"): {"policy_params": "{seed: 0}"},
        ("sim_demo.yaml", "theia_head"): {"policy_checkpoint": "package://theia_ros/config/demo_policy"}}


# ---------------------------------------------------------------- a recording stand-in for launch
class _Context:
    def __init__(self, arguments):
        self.launch_configurations = dict(arguments)
        self.environment = {}
        self.nodes = []


def _stub_modules():
    class LaunchDescription:
        def __init__(self, entities=()):
            self.entities = list(entities)

    class DeclareLaunchArgument:
        def __init__(self, name, default_value=None, description="", **kwargs):
            self.name, self.default_value, self.description = name, default_value, description

        def execute(self, context):  # as launch: a value given on the command line (or before) wins
            if self.name not in context.launch_configurations:
                if self.default_value is None:
                    raise RuntimeError(f"launch argument {self.name} is required")
                context.launch_configurations[self.name] = self.default_value

    class SetEnvironmentVariable:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def execute(self, context):
            context.environment[self.name] = self.value

    class OpaqueFunction:
        def __init__(self, function, args=None, kwargs=None):
            self.function, self.args, self.kwargs = function, args or [], kwargs or {}

        def execute(self, context):
            return self.function(context, *self.args, **self.kwargs)

    class PythonLaunchDescriptionSource:
        def __init__(self, launch_file_path):
            self.path = launch_file_path

    class IncludeLaunchDescription:
        def __init__(self, launch_description_source, launch_arguments=None):
            self.source, self.arguments = launch_description_source, dict(launch_arguments or {})

        def execute(self, context):
            context.launch_configurations.update(self.arguments)
            return load_launch_file(self.source.path).generate_launch_description().entities

    class LaunchConfiguration:
        def __init__(self, name, default=None):
            self.name, self.default = name, default

        def perform(self, context):
            if self.name in context.launch_configurations:
                return context.launch_configurations[self.name]
            if self.default is None:
                raise KeyError(f"launch configuration {self.name} is not set")
            return self.default

    class Node:
        lifecycle = False

        def __init__(self, *, package, executable, name=None, parameters=(), **kwargs):
            self.package, self.executable, self.name = package, executable, name
            self.parameters, self.kwargs = list(parameters), kwargs

        def execute(self, context):
            context.nodes.append(self)

    class LifecycleNode(Node):
        lifecycle = True

        def __init__(self, *, name, namespace, **kwargs):  # launch_ros requires both
            super().__init__(name=name, namespace=namespace, **kwargs)

    def get_package_share_directory(package):
        assert package == "theia_ros", package
        return str(ROOT)  # the source tree holds launch/ and config/ as share/theia_ros does

    contents = {
        "launch": {"LaunchDescription": LaunchDescription},
        "launch.actions": {"DeclareLaunchArgument": DeclareLaunchArgument, "OpaqueFunction": OpaqueFunction,
                           "SetEnvironmentVariable": SetEnvironmentVariable,
                           "IncludeLaunchDescription": IncludeLaunchDescription},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
        "launch.launch_description_sources": {"PythonLaunchDescriptionSource": PythonLaunchDescriptionSource},
        "launch_ros": {},
        "launch_ros.actions": {"Node": Node, "LifecycleNode": LifecycleNode},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": get_package_share_directory},
    }
    modules = {}
    for name, attributes in contents.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        modules[name] = module
    return modules


@contextlib.contextmanager
def launch_stubs():
    stubs = _stub_modules()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_launch_file(path):
    spec = importlib.util.spec_from_file_location(f"launch_file_{Path(path).stem.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _execute(entities, context):
    for entity in entities:
        _execute(getattr(entity, "entities", None) or entity.execute(context) or [], context)


def record_launch(launch_file, **arguments):
    """Run `launch_file` as `ros2 launch theia_ros <launch_file> name:=value ...` would: returns
    [(executable, node name, lifecycle, parameters)] of the nodes it starts, in order; each
    parameters file it passes is read (and removed)."""
    context = _Context(arguments)
    with launch_stubs():
        description = load_launch_file(ROOT / "launch" / launch_file).generate_launch_description()
        _execute(description.entities, context)
    started, files = [], set()
    for node in context.nodes:
        params = {}
        for source in node.parameters:
            assert isinstance(source, str), f"{node.name}: parameters {source!r} are not a file"
            params.update(yaml.safe_load(Path(source).read_text()))
            files.add(source)
        started.append((node.executable, node.name, node.lifecycle, params))
    for source in files:
        if Path(source).parent != ROOT / "config":
            os.unlink(source)
    return started


def record_bringup(yaml_file, *sets):
    """The processes `theia-ros bringup YAML --set ...` starts: [(module, section, lifecycle, parameters)]."""
    graph = Graph(bringup_params(ROOT / "config" / yaml_file, list(sets)))
    try:
        commands = graph.commands()
        started = []
        for node in graph.nodes:
            argv = commands[node.section]
            assert argv[:3] == [sys.executable, "-m", node.module] and argv[3:5] == ["--ros-args", "--params-file"]
            started.append((node.executable, node.section, node.lifecycle, yaml.safe_load(Path(argv[5]).read_text())))
        return started
    finally:
        graph.close()


def names(started):
    return [name for _, name, _, _ in started]


# ---------------------------------------------------------------- the same graph, both ways
@pytest.mark.parametrize("yaml_file", SHIPPED)
def test_launch_and_bringup_start_the_same_nodes_with_the_same_parameters(yaml_file):
    launched = record_launch("theia_graph.launch.py", params_file=str(ROOT / "config" / yaml_file))
    brought_up = record_bringup(yaml_file)
    assert launched == brought_up
    sections = yaml.safe_load((ROOT / "config" / yaml_file).read_text())
    assert set(names(launched)) == set(sections), "every section of the YAML starts its node, and only those"


def test_each_yaml_starts_its_own_sources():
    assert names(record_launch("theia_graph.launch.py", params_file=str(ROOT / "config" / "sim_demo.yaml"))) == [
        "theia_sim", "theia_encoder", "theia_policy"]
    assert names(record_launch("theia_graph.launch.py")) == [  # the default: config/demo.yaml
        "synthetic_camera", "theia_encoder", "theia_policy"]
    assert names(record_launch("theia_graph.launch.py", params_file=str(ROOT / "config" / "theia_encoder.yaml"))) \
        == ["theia_encoder"]


def test_sim_launch_runs_the_main_job_as_bringup_does():
    launched = record_launch("theia_sim.launch.py")
    assert names(launched) == ["theia_sim", "theia_encoder", "theia_policy"]
    assert launched == record_bringup("sim_demo.yaml")
    with_model = record_launch("theia_sim.launch.py", model="/ckpt/theia")  # the graph's arguments apply
    assert with_model == record_bringup("sim_demo.yaml", "theia_encoder.model=/ckpt/theia")
    assert with_model[1][3]["theia_encoder"]["ros__parameters"]["model"] == "/ckpt/theia"


def test_encoder_launch_starts_the_encoder_with_the_yamls_section():
    (executable, name, lifecycle, params), = record_launch("theia_encoder.launch.py", backend="onnxruntime",
                                                            autostart="false")
    assert (executable, name, lifecycle) == ("theia_encoder", "theia_encoder", True)
    want = yaml.safe_load((ROOT / "config" / "theia_encoder.yaml").read_text())["theia_encoder"]["ros__parameters"]
    want.update(backend="onnxruntime", autostart=False)
    assert params == {"theia_encoder": {"ros__parameters": want}}


# ---------------------------------------------------------------- swapping the policy
def policy_section(started):
    return next(params["theia_policy"]["ros__parameters"] for _, name, _, params in started if name == "theia_policy")


@pytest.mark.parametrize("yaml_file", SHIPPED)
@pytest.mark.parametrize("policy", POLICIES)
def test_one_argument_swaps_the_policy_with_every_yaml(yaml_file, policy):
    launched = record_launch("theia_graph.launch.py", params_file=str(ROOT / "config" / yaml_file), policy=policy)
    assert launched == record_bringup(yaml_file, f"theia_policy.policy={policy}")
    section = policy_section(launched)
    assert section["policy"] == policy
    own = {k: section[k] for k in ("policy_params", "policy_checkpoint") if k in section}
    assert own == KEPT.get((yaml_file, policy), {}), "the YAML's policy_params/policy_checkpoint are its policy's"
    # with demo.yaml `hold` starts too, and, with no joint_states to hold, commands nothing and says why
    # (it takes a position: test_policy_params_given_with_the_policy_are_kept)
    assert_policy_node_starts(launched)


def test_policy_params_given_with_the_policy_are_kept():
    params = "{position: [0, 0, 0, -1.5, 0, 1.5, 0]}"  # the README's example
    launched = record_launch("theia_graph.launch.py", params_file=str(ROOT / "config" / "demo.yaml"), policy="hold",
                             policy_params=params)
    assert launched == record_bringup("demo.yaml", "theia_policy.policy=hold", f"theia_policy.policy_params={params}")
    assert policy_section(launched)["policy_params"] == params  # the YAML text the policy reads, not a mapping
    assert_policy_node_starts(launched)
    same = record_launch("theia_graph.launch.py", params_file=str(ROOT / "config" / "demo.yaml"), policy="theia_head")
    assert policy_section(same)["policy_params"] == "{seed: 0}"  # the YAML's own policy: its params stay


def assert_policy_node_starts(started):
    """The policy node builds (in this process) from the parameters file the graph gives it."""
    params = {name: p[name] for _, name, _, p in started if name == "theia_policy"}
    from theia_ros.nodes.theia_policy import TheiaPolicyNode

    with tempfile.NamedTemporaryFile("w", prefix="theia_ros_test_", suffix=".yaml", delete=False) as f:
        dump_params(params, f)
    path = Path(f.name)
    context = Context()
    rclpy.init(context=context, args=["--ros-args", "--params-file", str(path)])
    try:
        node = TheiaPolicyNode(context=context)
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
        path.unlink()


# ---------------------------------------------------------------- the description itself
def test_the_description_names_installed_executables_and_declared_parameters():
    from theia_ros.nodes.theia_encoder import ENCODER_PARAMETERS
    from theia_ros.nodes.theia_policy import POLICY_PARAMETERS
    from theia_ros.policies.policy import CONFIG_FILE

    cmake = (ROOT / "CMakeLists.txt").read_text()
    for node in GRAPH_NODES:
        script = ROOT / "scripts" / node.executable
        assert f"from {node.module} import main" in script.read_text(), node
        assert f"scripts/{node.executable}" in cmake, node
    declared = {"theia_encoder": {p.name for p in ENCODER_PARAMETERS},
                "theia_policy": {p.name for p in POLICY_PARAMETERS}}
    for name, (section, parameter) in LAUNCH_ARGUMENTS.items():
        assert parameter in declared[section], name
    assert set(GRAPH_ARGUMENTS) | set(ENCODER_ARGUMENTS) == set(LAUNCH_ARGUMENTS)
    assert DEFAULT_POLICY == next(p.default for p in POLICY_PARAMETERS if p.name == "policy")
    assert CHECKPOINT_CONFIG == CONFIG_FILE
    assert (ROOT / "launch" / "theia_sim.launch.py").is_file() and "install(DIRECTORY launch config" in cmake


def test_values_read_as_yaml_and_mappings_stay_text():
    assert parse_value("hold") == "hold" and parse_value("2.5") == 2.5 and parse_value("[a, b]") == ["a", "b"]
    assert parse_value("{seed: 1}") == "{seed: 1}"
    assert parse_value("random:theia-tiny-patch16-224-cddsv") == "random:theia-tiny-patch16-224-cddsv"


def test_bringup_refuses_a_section_no_node_reads(tmp_path, capsys):
    from theia_ros.cli import bringup

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"theia_encoder": {"ros__parameters": {}}, "camera_driver": {}}))
    args = types.SimpleNamespace(params=str(path), demo=False, set=[], model=None, duration=1.0, summary_json=None)
    assert bringup.run(args) == 2
    assert "camera_driver" in capsys.readouterr().err


def test_a_node_that_cannot_start_names_itself_in_the_fatal_line():
    result = subprocess.run([sys.executable, "-m", "theia_ros.nodes.theia_policy", "--ros-args", "-p",
                             "policy:=no_such_policy"], capture_output=True, text=True, timeout=120,
                            env=child_environment())
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "[FATAL]" in out and "[theia_policy]: cannot start" in out and "TheiaPolicyNode" not in out, out
