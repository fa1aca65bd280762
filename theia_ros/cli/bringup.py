"""`theia-ros bringup`: start the theia_ros graph from a ROS parameters YAML, without `ros2 launch`.

Where ROS 2 is installed, `ros2 launch theia_ros theia_graph.launch.py params_file:=FILE` starts the
same nodes with the same parameters: both read one description of the graph
(theia_ros/nodes/graph_description.py). This command exists because `launch`/`launch_ros` are not
on PyPI: it starts each node section of the YAML (`synthetic_camera`, `theia_sim`, `theia_encoder`,
`theia_policy`) as its own process with `--ros-args --params-file`, watches /diagnostics, prints
live rates and latencies, and stops everything cleanly after `--duration` seconds or on Ctrl-C,
ending with a summary. `--set theia_policy.policy=NAME` swaps the policy as `policy:=NAME` does
under launch (the YAML's policy_params and policy_checkpoint, written for its own policy, are
dropped unless set too).
"""
import json
import sys
import time
from pathlib import Path

from theia_ros.resources import package_file


def summary_data(monitor, elapsed) -> dict:
    """What the run measured, as data (`--summary-json`); summary() prints it."""
    p = monitor.e2e.percentiles_ms()
    data = {"run_seconds": round(elapsed, 1), "features_received": monitor.features,
            "commands_received": monitor.commands, "sim_time": monitor.sim_time,
            "camera_to_features_ms": {"p50": round(p[50], 1), "p99": round(p[99], 1)},
            "episodes": None, "diagnostics": dict(sorted(monitor.status.items()))}
    if monitor.episodes:
        # the last episode is cut short by the end of the run unless it already succeeded
        ended = sorted(monitor.episodes)[:-1] + [e for e in sorted(monitor.episodes)[-1:] if monitor.episodes[e]]
        data["episodes"] = {"ended": len(ended), "succeeded": sum(monitor.episodes[e] for e in ended)}
    data["random_weights"] = any(values.get("random_weights") == "True" for name, values in data["diagnostics"].items()
                                 if name.endswith(": encoder"))
    return data


def summary(data) -> str:
    p = data["camera_to_features_ms"]
    clock = " (sim time, /clock at 100 Hz)" if data["sim_time"] else ""
    rows = [("run time", f"{data['run_seconds']:.1f} s"), ("features received", data["features_received"]),
            ("commands received", data["commands_received"]),
            (f"camera stamp -> features received{clock}", f"p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms")]
    if data["episodes"]:
        ended, wins = data["episodes"]["ended"], data["episodes"]["succeeded"]
        rate = f"{wins / ended:.0%}" if ended else "n/a"
        rows.append(("simulator episodes ended / succeeded / success rate", f"{ended} / {wins} / {rate}"))
    for name, values in data["diagnostics"].items():
        if name.startswith("theia_sim"):
            rates = ", ".join(f"{k[:-3]} {v} Hz" for k, v in values.items() if k.endswith("_hz"))
            rejected = sum(int(v) for k, v in values.items() if k.startswith("rejected_") and v.isdigit())
            rows.append((f"{name}: cameras / real-time factor / rejected commands",
                         f"{rates} / {values.get('real_time_factor', '?')} / {rejected}"))
        if "camera" in name and name.startswith("theia_encoder"):
            rows.append((f"{name}: frames in / encoded / dropped / bad", " / ".join(
                values.get(k, "?") for k in ("frames_in", "frames_out", "dropped_superseded", "rejected_bad_input"))))
            rows.append((f"{name}: inference / node overhead p50", f"{values.get('inference_ms_p50')} ms / "
                         f"{values.get('node_overhead_ms_p50')} ms"))
        if name.endswith(": policy"):
            rows.append((f"{name}: commands / rejected / clamped", " / ".join(
                values.get(k, "?") for k in ("commands", "rejected_actions", "clamped_position"))))
            rows.append((f"{name}: act p50", f"{values.get('act_ms_p50')} ms"))
    width = max(len(r[0]) for r in rows)
    lines = ["", "theia_ros bring-up summary" + (" [encoder with RANDOM WEIGHTS]" if data["random_weights"] else "")]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def bringup_params(path, sets=(), model=None) -> dict:
    """The parameters bringup starts the graph with: the YAML at `path`, `--set` and `--model` applied
    by the rules theia_graph.launch.py applies its arguments with."""
    from theia_ros.nodes.graph_description import graph_params, load_params, parse_overrides

    overrides = list(sets or [])
    if model:
        overrides.append(f"theia_encoder.model={model}")
    return graph_params(load_params(path), parse_overrides(overrides))


def run(args):
    # ROS is imported when the verb runs, not when the parser is built: `theia-ros` also serves machines without ROS
    from theia_ros.nodes.environment import use_package_fastdds_profile
    from theia_ros.nodes.graph import Graph
    from theia_ros.nodes.monitor import Monitor

    use_package_fastdds_profile()
    path = Path(args.params) if args.params else (package_file("config/demo.yaml") if args.demo else None)
    if path is None:
        print("bringup: give a parameters YAML or --demo", file=sys.stderr)
        return 2
    try:
        params = bringup_params(path, args.set, args.model)
        graph = Graph(params)
    except ValueError as exc:  # a bad --set, a section no node reads
        print(f"bringup: {exc}", file=sys.stderr)
        return 2
    model = params.get("theia_encoder", {}).get("ros__parameters", {}).get("model", "")
    print(f"[bringup] starting {', '.join(node.section for node in graph.nodes)} from {path}")
    if str(model).startswith("random:"):
        print(f"[bringup] RANDOM WEIGHTS ({model}): a demo of the plumbing, not of Theia's features. "
              "Pass --model <checkpoint dir or hub id> for real weights.")
    monitor = Monitor(params)
    graph.start()
    start = time.monotonic()
    interrupted = False
    failed = {}
    try:
        while args.duration <= 0 or time.monotonic() - start < args.duration:
            monitor.spin_for(min(2.0, max(args.duration - (time.monotonic() - start), 0.05))
                             if args.duration > 0 else 2.0)
            print(f"[bringup {time.monotonic() - start:5.1f} s] {monitor.line()}", flush=True)
            failed = graph.dead()
            if failed:
                print(f"[bringup] node(s) exited early: {failed}", file=sys.stderr)
                break
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.monotonic() - start
    codes = graph.stop()
    monitor.spin_for(0.2)
    data = summary_data(monitor, elapsed)
    monitor.close()
    print(summary(data), flush=True)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(data, indent=2))
    bad = {k: v for k, v in codes.items() if v != 0}  # a node stopped by SIGINT exits 0
    if failed or bad:
        print(f"[bringup] exit codes: {codes}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


def add_parser(subparsers):
    p = subparsers.add_parser("bringup", help="start the graph (camera, encoder, policy) from a YAML",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("params", nargs="?", help="ROS parameters YAML with a section per node")
    p.add_argument("--demo", action="store_true", help="use the embedded defaults (config/demo.yaml)")
    p.add_argument("--model", help="checkpoint directory or hub id for the encoder (overrides the YAML)")
    p.add_argument("--set", action="append", metavar="NODE.PARAM=VALUE", help="override a parameter")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0: until Ctrl-C")
    p.add_argument("--summary-json", metavar="PATH", help="also write the summary (and the last diagnostics of every "
                   "node) to PATH as JSON")
    p.set_defaults(func=run)
