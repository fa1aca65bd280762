"""A simulated Franka Panda (MuJoCo) for closed-loop tests of theia_ros, without ROS.

    from theia_ros.sim import Simulation, ReachExpert
    sim = Simulation()            # loads the scene, episode 0 with seed 0
    sim.reset(seed=3)             # a new episode
    expert = ReachExpert(sim)
    sim.command(expert.act_from_status(sim.status()))
    sim.run(3.0); rgb = sim.render("front", 224, 224); sim.status()["success"]

Rendering is headless (MUJOCO_GL defaults to egl). See docs/sim.md and ASSETS.md (licences).
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

from theia_ros.sim.core import HOME, REJECT_REASONS, CommandError, ReachExpert, RenderError, SimConfig, Simulation  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)
from theia_ros.sim.scene import AssetsNotFound, CameraSpec, SceneConfig, franka_assets_dir  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)
from theia_ros.sim.task import ReachConfig, ReachTask  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)

__all__ = ["HOME", "REJECT_REASONS", "AssetsNotFound", "CameraSpec", "CommandError", "ReachConfig", "ReachExpert",
           "ReachTask", "RenderError", "SceneConfig", "SimConfig", "Simulation", "franka_assets_dir"]
