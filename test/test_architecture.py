"""The layers the tree promises, checked from the source (every import, also those inside functions):

- only theia_ros/nodes/ and theia_ros/cli/ import rclpy or ROS message packages; the one exception is
  theia_ros/features.py, which packs messages and imports theia_ros.msg inside its functions;
- nothing outside nodes/ and cli/ imports theia_ros.nodes;
- there is no import circle between theia_ros modules.
"""
import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "theia_ros"
ROS_PACKAGES = {"rclpy", "rcl_interfaces", "builtin_interfaces", "lifecycle_msgs", "rosidl_runtime_py",
                "ament_index_python", "launch", "launch_ros", "message_filters", "cv_bridge", "sensor_msgs_py"}
ROS_LAYERS = ("theia_ros.nodes", "theia_ros.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(name: str, path: Path, known: set) -> list:
    """(imported module, line, inside a function) of every import statement of one module."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name.split(".")[: len(name.split(".")) - child.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    out.append((sub if sub in known else base, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def _is_ros(module: str) -> bool:
    top = module.split(".")[0]
    return (top in ROS_PACKAGES or top.endswith(("_msgs", "_srvs", "_interfaces"))
            or module == "theia_ros.msg" or module.startswith("theia_ros.msg."))


def _in_layer(module: str, layers) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in layers)


def test_only_nodes_and_cli_import_ros():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if _in_layer(name, ROS_LAYERS):
            continue
        for imported, line, in_function in _imports(name, path, set(modules)):
            if not _is_ros(imported):
                continue
            if name == "theia_ros.features" and imported == "theia_ros.msg" and in_function:
                continue
            offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {imported}")
    assert not offenders, "ROS imports outside theia_ros/nodes and theia_ros/cli:\n" + "\n".join(offenders)


def test_nothing_below_imports_the_nodes():
    modules = _modules()
    offenders = [f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {imported}"
                 for name, path in modules.items() if not _in_layer(name, ROS_LAYERS)
                 for imported, line, _ in _imports(name, path, set(modules))
                 if _in_layer(imported, ("theia_ros.nodes",))]
    assert not offenders, "imports of theia_ros.nodes from below:\n" + "\n".join(offenders)


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_circle():
    modules = _modules()
    graph = {name: {imported for imported, _, _ in _imports(name, path, set(modules))
                    if imported in modules and imported != name}
             for name, path in modules.items()}
    assert not _cycles(graph), f"import circles (counting imports inside functions): {_cycles(graph)}"


def test_the_checks_see_what_they_check():
    """The checks above read what they claim to: a circle, a ROS import and a relative import are found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _is_ros("sensor_msgs.msg") and _is_ros("rclpy.node") and _is_ros("theia_ros.msg")
    assert not _is_ros("numpy") and not _is_ros("theia_ros.features")
    modules = _modules()
    imports = _imports("theia_ros.nodes.theia_encoder", modules["theia_ros.nodes.theia_encoder"], set(modules))
    assert any(i == "rclpy.lifecycle" for i, _, _ in imports)
    assert any(i == "theia_ros.backends.factory" for i, _, _ in imports)


def test_the_command_line_needs_no_ros_until_a_ros_verb_runs():
    """`theia-ros` serves machines without ROS (a training server encoding bags): building the parser and
    the plain-Python verbs import no rclpy and no ROS messages."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "for name in ('rclpy', 'rcl_interfaces', 'std_msgs', 'sensor_msgs', 'diagnostic_msgs', 'theia_ros.msg'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "from theia_ros.cli.main import build_parser, main\n"
        "parser = build_parser()\n"
        "verbs = sorted(parser._subparsers._group_actions[0].choices)\n"
        "print(' '.join(verbs))\n"
        "import theia_ros.bags.encode, theia_ros.bags.inspect, theia_ros.bags.train_policy\n"
        "import theia_ros.encoder.pipeline\n"
        "sys.exit(main(['info', 'random:theia-tiny-patch16-224-cddsv']))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    verbs = set(result.stdout.splitlines()[0].split())
    assert {"encode-bag", "inspect", "train-policy", "info", "bringup", "record", "collect"} <= verbs, verbs
    assert "theia-tiny-patch16-224-cddsv" in result.stdout
