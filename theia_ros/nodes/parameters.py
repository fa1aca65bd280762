"""The one way a theia_ros node declares and reads its parameters.

Each node lists its parameters once, as data (a tuple of :class:`Param`, next to the node): the
declarations (descriptions, ranges, choices: ``ros2 param describe``), the defaults that
``config/*.yaml`` and the README repeat (test/test_launch_and_config.py compares them), and the
validation all come from that list. :func:`read_parameters` reads them once, when the node is
built or configured, into a namespace of named attributes; per-frame code never looks a parameter up.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Sequence

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    choices: tuple = ()
    int_range: tuple | None = None
    float_range: tuple | None = None
    read_only: bool = True
    attr: str | None = None  # attribute name when the parameter's own name does not fit (per-camera names)

    @property
    def attribute(self) -> str:
        """Attribute name in the namespace read_parameters returns ('tensorrt.fp32_acc' -> 'tensorrt_fp32_acc')."""
        return self.attr or self.name.replace(".", "_")

    def descriptor(self) -> ParameterDescriptor:
        text = self.description + (f" One of: {', '.join(map(str, self.choices))}." if self.choices else "")
        descriptor = ParameterDescriptor(description=text, read_only=self.read_only)
        if self.int_range:
            lo, hi = self.int_range
            descriptor.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
        if self.float_range:
            lo, hi = self.float_range
            descriptor.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
        return descriptor

    def check(self, value):
        if self.choices and value not in self.choices:
            raise ValueError(f"parameter {self.name}={value!r}: must be one of {', '.join(map(str, self.choices))}")
        return value


def declare_parameters(node, params: Sequence[Param]) -> None:
    for p in params:
        node.declare_parameter(p.name, p.default, p.descriptor())


def read_parameters(node, params: Sequence[Param], into: SimpleNamespace | None = None) -> SimpleNamespace:
    """Read `params` (declared before) once into a namespace, validating choices; a bad value raises
    ValueError naming the parameter. With `into`, the values are added to that namespace."""
    values = into if into is not None else SimpleNamespace()
    for p in params:
        setattr(values, p.attribute, p.check(node.get_parameter(p.name).value))
    return values


def defaults(params: Sequence[Param]) -> dict:
    """name -> default (what config/*.yaml and the README state)."""
    return {p.name: p.default for p in params}


def markdown_table(params: Sequence[Param]) -> str:
    """The README's table of a node's parameters (name, default, description), rows in declaration order."""
    rows = ["| parameter | default | description |", "|---|---|---|"]
    for p in params:
        default = f"`{yaml_value(p.default)}`"
        text = p.description + (f" One of: {', '.join(map(str, p.choices))}." if p.choices else "")
        rows.append(f"| `{p.name}` | {default} | {text.replace('|', '/')} |")
    return "\n".join(rows)


def yaml_value(value) -> str:
    """A default as a ROS parameters YAML writes it (what users copy into their files)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()
