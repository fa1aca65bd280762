"""The theia_ros graph, written once as data: which node each section of a ROS parameters YAML
starts (executable, lifecycle or not), in which order, and how command-line overrides change the
YAML. `ros2 launch theia_ros theia_graph.launch.py` (the launch files import this module from the
installed package) and `theia-ros bringup` (nodes/graph.py) both start the graph from here, with
one merged parameters file per run, so they start the same nodes with the same parameters.

Plain Python and PyYAML only (no rclpy, no launch): launch files import it, and
test/test_graph_description.py records the launch files without launch installed.

The rules:
- every section of the YAML starts its node, and only those; a section no node reads is an error;
- overrides (`name:=value` launch arguments, `--set section.parameter=value` for bringup) are
  read as YAML values, except that text reading as a mapping stays text (no ROS parameter is a
  mapping; `policy_params:="{seed: 1}"` is the YAML text the policy reads); an override of a
  section the YAML lacks adds that section (its node starts with its defaults otherwise);
- `policy_params` and `policy_checkpoint` belong to the YAML's policy: an override of `policy`
  naming another policy than the YAML's drops them, unless the same overrides set them too. The
  YAML's policy is its `policy`; `hold` (the node's default) where it has none; the checkpoint's
  (its config.yaml's `policy`) where it is "" and a checkpoint is set.
"""
import copy
import os
import tempfile
from dataclasses import dataclass

import yaml

from theia_ros.resources import resolve_package_path

PACKAGE = "theia_ros"


@dataclass(frozen=True)
class GraphNode:
    section: str  # its section of the parameters YAML, and the node's name
    executable: str  # lib/theia_ros/<executable> (ros2 run, ros2 launch); scripts/<executable> in the source
    lifecycle: bool = False

    @property
    def module(self) -> str:
        """The module whose main() the executable runs (bringup starts `python -m <module>`)."""
        return f"theia_ros.nodes.{self.executable}"


# Data-flow order (sources, encoder, policy): the order nodes start in and bringup stops them in.
GRAPH_NODES = (
    GraphNode("synthetic_camera", "synthetic_camera"),
    GraphNode("theia_sim", "theia_sim"),
    GraphNode("theia_encoder", "theia_encoder", lifecycle=True),
    GraphNode("theia_policy", "theia_policy"),
)
NODES_BY_SECTION = {node.section: node for node in GRAPH_NODES}

# launch argument -> (section, parameter) it overrides; bringup: --set section.parameter=value
LAUNCH_ARGUMENTS = {
    "model": ("theia_encoder", "model"),
    "backend": ("theia_encoder", "backend"),
    "precision": ("theia_encoder", "precision"),
    "device": ("theia_encoder", "device"),
    "representation": ("theia_encoder", "representation"),
    "policy": ("theia_policy", "policy"),
    "policy_checkpoint": ("theia_policy", "policy_checkpoint"),
    "policy_params": ("theia_policy", "policy_params"),
}
# theia_graph.launch.py's (the encoder's representation alone would no longer match the policy's)
GRAPH_ARGUMENTS = ("model", "backend", "precision", "device", "policy", "policy_checkpoint", "policy_params")
# theia_encoder.launch.py's
ENCODER_ARGUMENTS = ("model", "backend", "precision", "device", "representation")

POLICY_SECTION = "theia_policy"
DEFAULT_POLICY = "hold"  # theia_policy's default `policy` (test/test_graph_description.py checks it)
POLICY_OWN_PARAMETERS = ("policy_params", "policy_checkpoint")  # written for one policy
CHECKPOINT_CONFIG = "config.yaml"  # a policy checkpoint's config (theia_ros.policies.policy.CONFIG_FILE)


def parse_value(text: str):
    """A command-line value, read as YAML; text that reads as a mapping stays text."""
    value = yaml.safe_load(text)
    return text if isinstance(value, dict) else value


def parse_overrides(items) -> dict:
    """`section.parameter=value` strings -> {section: {parameter: value}}."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise ValueError(f"override {item!r}: expected node.parameter=value")
        overrides.setdefault(section, {})[name] = parse_value(text)
    return overrides


def launch_overrides(arguments: dict) -> dict:
    """Launch arguments {name: text} -> {section: {parameter: value}}; empty text: not given."""
    overrides = {}
    for name, text in arguments.items():
        if text != "":
            section, parameter = LAUNCH_ARGUMENTS[name]
            overrides.setdefault(section, {})[parameter] = parse_value(text)
    return overrides


def yaml_policy(section: dict):
    """The policy a theia_policy section runs: its `policy`, the default where it has none, the
    checkpoint's where it is "" (None if that checkpoint's config cannot be read)."""
    policy = section.get("policy", DEFAULT_POLICY)
    checkpoint = section.get("policy_checkpoint") or ""
    if policy or not checkpoint:
        return policy
    try:
        with open(os.path.join(resolve_package_path(checkpoint), CHECKPOINT_CONFIG)) as f:
            return (yaml.safe_load(f) or {}).get("policy")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def apply_overrides(params: dict, overrides: dict) -> dict:
    """`params` (a parameters YAML's contents, changed in place and returned) with `overrides`
    ({section: {parameter: value}}) applied by the rules of this module."""
    for section, values in overrides.items():
        current = params.setdefault(section, {}).setdefault("ros__parameters", {})
        if section == POLICY_SECTION and "policy" in values and values["policy"] != yaml_policy(current):
            for name in POLICY_OWN_PARAMETERS:
                if name not in values:
                    current.pop(name, None)
        current.update(values)
    return params


def load_params(path) -> dict:
    """A parameters YAML's contents: {section: {"ros__parameters": {...}}}."""
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{path}: not a ROS parameters YAML (a mapping of node sections)")
    return params


def graph_params(params: dict, overrides: dict) -> dict:
    """The parameters a run starts with: a copy of the YAML's, overrides applied."""
    return apply_overrides(copy.deepcopy(params), overrides)


def graph_nodes(params: dict) -> list:
    """The nodes `params` starts (one per section), in data-flow order."""
    unknown = sorted(set(params) - set(NODES_BY_SECTION))
    if unknown:
        raise ValueError(f"no node to start for sections {unknown}; known: {sorted(NODES_BY_SECTION)}")
    return [node for node in GRAPH_NODES if node.section in params]


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # rcl's YAML parser refuses anchors and aliases
        return True


def dump_params(params, stream=None):
    """A ROS parameters YAML (no anchors/aliases, which rcl refuses)."""
    return yaml.dump(params, stream, Dumper=_NoAliasDumper, sort_keys=False)


def write_params(params, prefix="theia_ros_") -> str:
    """`params` in a new temporary parameters file (`--params-file`); returns its path."""
    with tempfile.NamedTemporaryFile("w", prefix=prefix, suffix=".yaml", delete=False) as f:
        dump_params(params, f)
    return f.name
