"""`theia-ros encode-bag | inspect | train-policy | record`: the rosbag2 tools (see docs/bags.md)."""
import json
import logging
import sys


def _setup_logging(verbose=False):
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s",
                            stream=sys.stderr)
    logging.getLogger("theia_ros").setLevel(logging.DEBUG if verbose else logging.INFO)


def _error(message):
    print(f"error: {message}", file=sys.stderr)
    return 1


def _run_encode(args) -> int:
    from theia_ros.bags.encode import encode_bag
    from theia_ros.bags.io import BagError, BagReadError

    _setup_logging()
    try:
        result = encode_bag(args.input, args.output, model=args.model, seed=args.seed, backend=args.backend,
                            precision=args.precision, device=args.device, representation=args.representation,
                            dtype=args.dtype, preprocessing=args.preprocessing, input_size=args.input_size,
                            pos_interpolation=args.pos_interpolation, cameras=args.cameras, batch=args.batch,
                            copy=not args.no_copy,
                            overwrite=args.overwrite, storage=args.storage, version=args.bag_version,
                            threads=args.threads, progress=not args.no_progress)
    except BagReadError as exc:
        result = getattr(exc, "result", None)
        if result is not None:
            _print_encode_summary(result)
        return _error(str(exc))
    except BagError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error(f"interrupted; {args.output} holds what was encoded so far (custom_data complete: false)")
    _print_encode_summary(result)
    return 0


def _run_encode_bags(args) -> int:
    from theia_ros.bags.io import BagError

    _setup_logging()
    logging.getLogger("theia_ros").setLevel(logging.WARNING)  # fleet progress and the summary say the rest
    try:
        from theia_ros.bags.fleet import encode_bags, format_summary

        report = encode_bags(
            args.inputs, args.out, dict(model=args.model, seed=args.seed, backend=args.backend,
                                        precision=args.precision, device=args.device,
                                        representation=args.representation, dtype=args.dtype,
                                        preprocessing=args.preprocessing, input_size=args.input_size,
                                        pos_interpolation=args.pos_interpolation, cameras=args.cameras,
                                        batch=args.batch, copy=not args.no_copy, storage=args.storage,
                                        version=args.bag_version),
            workers=args.workers, threads=args.threads, address=args.address, retries=args.retries,
            gpus_per_worker=args.gpus_per_worker, overwrite=args.overwrite, progress=not args.no_progress)
    except BagError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return _error(f"interrupted; the bags finished so far are recorded in {args.out}: run the same command "
                      "again to encode the rest")
    print(format_summary(report))
    print(f"summary: {report.out / 'encode-bags-summary.json'}; manifest: {report.out / 'encode-bags.jsonl'}")
    for message in report.input_errors:
        print(f"input error: {message}", file=sys.stderr)
    return 0 if report.ok else 1


def _print_encode_summary(result):
    print(f"wrote {result.output}")
    for topic, target in result.topics.items():
        bad = result.bad_frames.get(topic, 0)
        print(f"  {topic} -> {target}: {result.frames.get(topic, 0)} frames"
              + (f", {bad} undecodable frames skipped" if bad else ""))
    print(f"  copied {result.copied} other messages" + (
        f"; not copied (no type definition): {', '.join(result.skipped_topics)}" if result.skipped_topics else ""))
    print(f"  {result.frames_total + result.bad_total} frames in {result.seconds:.1f} s "
          f"({result.frames_per_second:.1f} frames/s)")


def _run_inspect(args) -> int:
    from theia_ros.bags.inspect import format_inspect, inspect_bag
    from theia_ros.bags.io import BagError

    _setup_logging()
    try:
        info = inspect_bag(args.bag, gaps=args.gaps)
    except BagError as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_inspect(info))
    return 1 if info.get("error") else 0


def _run_train(args) -> int:
    from theia_ros.bags.io import BagError
    from theia_ros.bags.train_policy import TrainError, parse_params, train_policy

    _setup_logging()
    try:
        result = train_policy(
            args.bags, policy=args.policy, out=args.out, action_topic=args.action_topic,
            action_type=args.action_type, action_joints=args.action_joints, action_mode=args.action_mode,
            features_topics=args.features_topics, proprio_topic=args.proprio_topic,
            proprio_joints=args.proprio_joints, tolerance=args.tolerance, episode_gap=args.episode_gap,
            history=args.history, stamp=args.stamp, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, val_fraction=args.val_fraction, seed=args.seed,
            params=parse_params(args.param), max_steps=args.max_steps, threads=args.threads,
            plot=not args.no_plot, overwrite=args.overwrite)
    except (TrainError, BagError) as exc:
        return _error(str(exc))
    print(f"trained in {result.seconds:.1f} s ({result.steps} steps)")
    return 0


def _run_record(args) -> int:
    from theia_ros.bags.io import BagError
    from theia_ros.nodes.recorder import record

    _setup_logging()
    try:
        counts = record(args.output, args.topics, storage=args.storage, version=args.bag_version,
                        duration=args.duration, overwrite=args.overwrite, max_messages=args.max_messages)
    except BagError as exc:
        return _error(str(exc))
    print(f"wrote {args.output}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return 0


def add_parser(subparsers):
    _add_encode_parser(subparsers)
    _add_encode_bags_parser(subparsers)
    _add_inspect_parser(subparsers)
    _add_train_parser(subparsers)
    _add_record_parser(subparsers)


def _add_encode_parser(subparsers):
    from theia_ros.cli.options import add_encode_bag_options

    p = subparsers.add_parser(
        "encode-bag", help="encode the camera topics of a rosbag2 bag into Theia features (new bag)",
        description="Read a rosbag2 bag (sqlite3 or MCAP; a bag directory or a single .mcap/.db3 file), encode "
                    "its camera topics (sensor_msgs/Image or CompressedImage) in batches and write a new bag "
                    "with one theia_ros/msg/Features topic per camera (/front/image_raw -> /front/features, "
                    "stamped like the images) and, unless --no-copy, every other topic copied unchanged. "
                    "Exit status 1 on a corrupt or truncated input; the output then holds everything before "
                    "the damage.")
    p.add_argument("input", metavar="IN", help="input bag (directory, .mcap or .db3)")
    p.add_argument("output", metavar="OUT", help="output bag directory (must not exist, see --overwrite)")
    add_encode_bag_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_encode)


def _add_encode_bags_parser(subparsers):
    from theia_ros.cli.options import add_encode_bag_options

    p = subparsers.add_parser(
        "encode-bags", help="encode many bags on Ray workers (local or a cluster), resumable",
        description="encode-bag for a fleet's bags: each input is encoded by a Ray worker (the model loaded "
                    "once per worker) into OUT/<input bag name>/, which holds exactly what encode-bag writes "
                    "for it with the same options. OUT/encode-bags.jsonl records each bag's outcome: a run "
                    "started again skips the bags finished with the same input, options and encoder, and redoes "
                    "the rest; a bag whose worker died is retried on another. Exit status 0 only when every "
                    "input finished complete. Needs the fleet extra (Ray); see docs/bags.md.")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="bag directories or .mcap/.db3 files, directories of bags, globs (quoted), or manifest "
                        "files with one path or glob per line (# comments)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: DIR/<input bag name>/ per bag")
    add_encode_bag_options(p, threads_help="torch threads, and CPUs, of each worker (0: 1)",
                           overwrite_help="re-encode finished bags too, and replace a DIR/<name> bag that is not an "
                                          "encode-bag output of its input")
    fleet = p.add_argument_group("fleet")
    fleet.add_argument("--address", default=None, metavar="ADDRESS",
                       help="Ray cluster to join: auto (a `ray start` cluster on this machine) or ray://HOST:PORT; "
                            "default: a local Ray started for this run")
    fleet.add_argument("--workers", type=int, default=None, metavar="N",
                       help="Ray workers (default: one per GPU where the device may be CUDA and there are GPUs, "
                            "else one per --threads CPUs)")
    fleet.add_argument("--gpus-per-worker", type=float, default=1.0, metavar="F",
                       help="GPU share of each worker where there are GPUs, e.g. 0.25: four workers per GPU "
                            "(default 1)")
    fleet.add_argument("--retries", type=int, default=2,
                       help="times a bag whose worker died is retried (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=_run_encode_bags)


def _add_inspect_parser(subparsers):
    p = subparsers.add_parser(
        "inspect", help="summarise a rosbag2 bag: topics, counts, rates, gaps, features",
        description="Topics, types, message counts, rates, largest gaps and duration of a bag; for "
                    "theia_ros/msg/Features topics also shape, dtype, representation, model id, weights id, "
                    "whether the weights are random, and the preprocessing (profile, input size, patch grid; bags "
                    "from before those fields: theia at 224x224).")
    p.add_argument("bag", metavar="BAG")
    p.add_argument("--gaps", type=int, default=3, help="largest gaps listed per topic (default 3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_inspect)


def _add_train_parser(subparsers):
    from theia_ros.cli.options import add_encoder_options

    p = subparsers.add_parser(
        "train-policy", help="behaviour cloning of a built-in policy from bags of features and actions",
        description="Align features with actions by stamp, split train/validation by episode, train a policy "
                    "(AdamW, MSE on normalised actions), save a checkpoint the policy node loads, and plot the "
                    "losses and predicted vs recorded actions. The checkpoint records the features' preprocessing "
                    "(the policy node refuses features made otherwise); bags that mix preprocessings are refused.")
    p.add_argument("bags", metavar="BAG", nargs="+", help="bags with feature topics (one episode each, or "
                                                           "several separated by --episode-gap)")
    p.add_argument("--policy", default="theia_head", help="theia_head, mlp or a registered policy (default "
                                                          "theia_head)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--action-topic", required=True, metavar="TOPIC")
    p.add_argument("--action-type", default="auto",
                   choices=("auto", "command", "trajectory", "joint_state", "joint_command"),
                   help="command: std_msgs/Float64MultiArray; trajectory: trajectory_msgs/JointTrajectory (first "
                        "point); joint_state: sensor_msgs/JointState measured, next-state positions as targets; "
                        "joint_command: sensor_msgs/JointState commands, positions as they are; auto: by type "
                        "(JointState -> joint_state)")
    p.add_argument("--action-joints", nargs="+", metavar="NAME",
                   help="action joint names (their order); required names for Float64MultiArray (default "
                        "joint_0..)")
    p.add_argument("--action-mode", default="position", choices=("position", "velocity"))
    p.add_argument("--features-topics", nargs="+", metavar="TOPIC", help="default: every Features topic")
    p.add_argument("--proprio-topic", metavar="TOPIC", help="sensor_msgs/JointState topic for proprioception")
    p.add_argument("--proprio-joints", nargs="+", metavar="NAME", help="default: the joints of the first message")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest stamp difference when aligning, s")
    p.add_argument("--episode-gap", type=float, default=2.0, help="a longer gap between frames starts an episode, s")
    p.add_argument("--history", type=int, default=1, help="frames per observation (default 1)")
    p.add_argument("--stamp", default="header", choices=("header", "receive"),
                   help="align by header stamps (default; headerless messages use receive time) or bag receive "
                        "times")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of episodes used for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="policy param (YAML value), e.g. --param channels=128 --param mlp_hidden=[128]")
    add_encoder_options(p, "threads")
    p.add_argument("--no-plot", action="store_true", help="do not write DIR/training.png")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint in DIR")
    p.set_defaults(func=_run_train)


def _add_record_parser(subparsers):
    from theia_ros.cli.options import add_bag_output_options

    p = subparsers.add_parser(
        "record", help="record topics into a rosbag2 bag with rclpy + rosbags (no rosbag2 needed)",
        description="Subscribe to topics (raw, with the QoS their publishers offer) and write every message "
                    "with its receive time, like `ros2 bag record`, for machines without rosbag2. Ctrl-C stops.")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--topics", nargs="+", required=True, metavar="TOPIC")
    add_bag_output_options(p)
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--max-messages", type=int, default=None, help="stop after this many messages")
    p.set_defaults(func=_run_record)
