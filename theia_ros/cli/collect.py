"""`theia-ros collect`: record expert demonstrations in the simulator, one rosbag2 bag per episode.

It starts the simulator node (theia_sim, its own process), then in this process a scripted expert
node and a recorder, which talk to the simulator only through its topics and services:

  theia_sim --/sim/episode (privileged object position)--> expert --/commands--> theia_sim
  theia_sim --<camera>/image_raw, joint_states--> recorder <--/commands--  (the bag of the episode)

For each episode: the simulator's `seed` parameter is set and `~/reset` called; the expert solves
IK for the point above the cube (from the privileged status) and commands that joint target (the
simulator follows it at its joint speed limit); the recorder writes the camera images, joint
states, commands and the episode status with their receive times (simulation time) into
OUT/episode_NNN_seed_S. Messages stamped before the reset are not recorded. OUT/summary.json lists
the episodes (seed, success, time to success, message counts).

Next: `theia-ros encode-bag` each bag, `theia-ros train-policy` on the features bags with
`--action-topic /commands --action-joints panda_joint1 ... panda_joint7` (see docs/sim.md).

"""
import sys
from pathlib import Path

from theia_ros.bags.io import DEFAULT_STORAGE, STORAGES


def _run(args):
    from theia_ros.nodes.collect import collect  # ROS only when the verb runs

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
    p.add_argument("--storage", default=DEFAULT_STORAGE, choices=STORAGES,
                   help=f"bag storage (default {DEFAULT_STORAGE})")
    p.add_argument("--set", action="append", metavar="theia_sim.PARAM=VALUE", help="simulator parameter")
    p.add_argument("--no-sim", action="store_true", help="use an already running theia_sim")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing episode bags")
    p.set_defaults(func=_run)
