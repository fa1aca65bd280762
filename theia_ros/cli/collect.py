"""`theia-ros collect`: record expert demonstrations in the simulator, one rosbag2 bag per episode
(see theia_ros.nodes.collect)."""
import sys
from pathlib import Path

from theia_ros.nodes.collect import collect

def _run(args):
    try:
        summary = collect(args.output, args.episodes, seed=args.seed, duration=args.duration, cameras=args.cameras,
                          width=args.width, height=args.height, camera_rate=args.camera_rate,
                          real_time_factor=args.real_time_factor, storage=args.storage, overrides=args.set or [],
                          expert_rate=args.expert_rate, overwrite=args.overwrite, start_sim=not args.no_sim)
    except (FileExistsError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"{summary['successes']}/{len(summary['episodes'])} expert episodes succeeded, in "
          f"{summary['seconds']:.1f} s; summary: {Path(args.output) / 'summary.json'}")
    return 0


def add_parser(subparsers):
    import argparse

    p = subparsers.add_parser("collect", help="record expert demonstrations in the simulator (one bag per episode)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUT", help="directory for the episode bags and summary.json")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode; then seed+1, ... (default 0)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds of simulation time per episode (default 4)")
    p.add_argument("--cameras", nargs="+", default=["front"], help="cameras to publish and record (front, wrist)")
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--camera-rate", type=float, default=15.0, help="frames per second per camera (default 15)")
    p.add_argument("--real-time-factor", type=float, default=1.0,
                   help="simulation speed; >1 records faster than real time, 0 as fast as possible (default 1)")
    p.add_argument("--expert-rate", type=float, default=20.0, help="expert command rate, Hz (default 20)")
    p.add_argument("--storage", default="mcap", choices=("mcap", "sqlite3"))
    p.add_argument("--set", action="append", metavar="theia_sim.PARAM=VALUE", help="simulator parameter")
    p.add_argument("--no-sim", action="store_true", help="use an already running theia_sim")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing episode bags")
    p.set_defaults(func=_run)
