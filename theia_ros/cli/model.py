"""`theia-ros info SOURCE`: load a Theia checkpoint and describe it (no ROS needed)."""
import json
import sys


def _run_info(args) -> int:
    from theia_ros.encoder.model import load_model
    from theia_ros.weights import CheckpointError

    try:
        model = load_model(args.source, seed=args.seed)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"variant:        {info['variant']}")
    print(f"model id:       {info['model_id']}")
    print(f"parameters:     {info['num_parameters']:,}")
    print(f"weights id:     {info['weights_id']}")
    print(f"random weights: {'yes' if info['random_weights'] else 'no'}")
    side = info["image_size"]
    print(f"hidden size:    {info['hidden_size']} ({info['num_tokens']} patch tokens at {side}x{side})")
    print(f"teachers:       {len(info['teachers'])}")
    for teacher in info["teachers"]:
        c, h, w = info["target_feature_sizes"][teacher]
        print(f"  {teacher}: {c}x{h}x{w}")
    return 0


def add_parser(subparsers):
    from theia_ros.cli.options import add_encoder_options, add_source_argument

    parser = subparsers.add_parser(
        "info", help="describe a Theia checkpoint",
        description="Load a Theia checkpoint (local directory, hub id, or random:<variant>) and print "
                    "its variant, parameter count, weights digest, hidden size and teachers.")
    add_source_argument(parser)
    add_encoder_options(parser, "seed")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    parser.set_defaults(func=_run_info)
    return parser
