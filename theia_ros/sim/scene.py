"""MJCF scene of the simulated robot: a Franka Panda on a table, a target cube, cameras.

The Panda (meshes, kinematic chain, position actuators) comes from the `gymnasium-robotics`
wheel (kitchen_franka/franka_assets, MIT; itself modified from Vikash Kumar's Apache-2.0 Franka
model, see ASSETS.md). Its files are found with importlib.util.find_spec, without importing
gymnasium, and merged in memory into a scene of our own: nothing is copied or written to disk.

Our changes to the robot, all in memory: absolute mesh directory, gravity compensation on the
arm's bodies (so that position control has no steady-state sag), a wrist camera on the hand.
"""
from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# MJCF name -> ROS joint name (the names used by franka_description / ros2_control)
ARM_JOINTS = tuple(f"robot:panda0_joint{i}" for i in range(1, 8))
FINGER_JOINTS = ("robot:panda0_finger_joint1", "robot:panda0_finger_joint2")
ROS_JOINT_NAMES = {**{j: f"panda_joint{i}" for i, j in enumerate(ARM_JOINTS, 1)},
                   FINGER_JOINTS[0]: "panda_finger_joint1", FINGER_JOINTS[1]: "panda_finger_joint2"}
EE_SITE = "end_effector"
CUBE_BODY = "target_cube"
TABLE_TOP_Z = 0.0  # the robot stands on the table top (z = 0); the floor is below


class AssetsNotFound(RuntimeError):
    pass


def franka_assets_dir() -> Path:
    """Directory of the Franka assets inside the installed gymnasium-robotics wheel."""
    spec = importlib.util.find_spec("gymnasium_robotics")
    if spec is None or not spec.submodule_search_locations:
        raise AssetsNotFound("the Franka Panda model comes from the gymnasium-robotics wheel: "
                             "pip install --no-deps gymnasium-robotics==1.4.2 (see requirements-nodeps.txt)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "envs" / "assets" / "kitchen_franka" / "franka_assets"
        if (path / "chain.xml").is_file():
            return path
    raise AssetsNotFound(f"gymnasium_robotics found at {list(spec.submodule_search_locations)} but without "
                         "envs/assets/kitchen_franka/franka_assets/chain.xml")


@dataclass
class CameraSpec:
    """A camera of the scene. Fixed cameras look from `pos` at `target`; the wrist camera rides on the hand."""
    name: str
    fovy: float = 58.0
    pos: tuple = (0.0, 0.0, 0.0)
    target: tuple | None = None  # world point looked at (fixed cameras)
    body: str | None = None  # None: fixed in the world; else attached to this body (pos/xyaxes in its frame)
    xyaxes: tuple | None = None
    up: tuple = (0.0, 0.0, 1.0)  # image up hint when xyaxes is derived from target


@dataclass
class SceneConfig:
    cube_size: float = 0.06  # edge (m)
    cube_rgba: tuple = (0.9, 0.1, 0.1, 1.0)
    distractors: int = 0  # extra objects (other colours/shapes), randomised each episode
    table_size: tuple = (0.5, 0.6)  # half extents x, y (m)
    table_center: tuple = (0.3, 0.0)
    max_width: int = 640
    max_height: int = 480
    cameras: list = field(default_factory=lambda: [
        CameraSpec("front", fovy=48.0, pos=(1.05, 0.0, 0.75), target=(0.42, 0.0, 0.1)),
        # on the hand (panda0_link7 frame: z along the flange, fingers open along x-y), beside the
        # fingers, looking past the finger tips at the table under the gripper
        CameraSpec("wrist", fovy=70.0, body="panda0_link7", pos=(0.06, -0.06, 0.1), target=(-0.02, 0.02, 0.45),
                   up=(1.0, 1.0, 0.0)),
    ])


DISTRACTOR_RGBA = [(0.1, 0.3, 0.9, 1.0), (0.1, 0.75, 0.2, 1.0), (0.95, 0.8, 0.1, 1.0), (0.6, 0.2, 0.8, 1.0)]


def _xyaxes_looking_at(pos, target, up=(0.0, 0.0, 1.0)):
    """MJCF xyaxes of a camera at `pos` looking at `target` with the image's up roughly along `up`."""
    pos, target = np.asarray(pos, float), np.asarray(target, float)
    forward = target - pos
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, float))
    if np.linalg.norm(right) < 1e-6:  # looking along `up`
        right = np.cross(forward, [1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return tuple(np.round(np.concatenate([right, up]), 6))


def _fmt(values):
    return " ".join(f"{float(v):.6g}" for v in values)


def _include_children(path: Path):
    """The elements inside a <mujocoinclude> file."""
    root = ET.parse(path).getroot()
    return list(root)


def build_mjcf(config: SceneConfig | None = None) -> str:
    """The scene's MJCF text (meshes referenced by absolute path)."""
    config = config or SceneConfig()
    assets = franka_assets_dir()
    root = ET.Element("mujoco", model="theia_sim_reach")
    ET.SubElement(root, "compiler", angle="radian", meshdir=str(assets / "meshes"), autolimits="true")
    ET.SubElement(root, "option", timestep="0.002", integrator="implicitfast")
    visual = ET.SubElement(root, "visual")
    ET.SubElement(visual, "global", offwidth=str(config.max_width), offheight=str(config.max_height))
    # shadows and multisampling dominate CPU render time (SIM.md): both off
    ET.SubElement(visual, "quality", shadowsize="0", offsamples="0")
    ET.SubElement(visual, "headlight", ambient="0.35 0.35 0.35", diffuse="0.45 0.45 0.45", specular="0.1 0.1 0.1")
    ET.SubElement(visual, "map", znear="0.01", zfar="20")

    # robot defaults, meshes and actuators from the wheel (assets.xml also sets compiler/option/size;
    # our compiler keeps its absolute meshdir because we drop theirs)
    for element in _include_children(assets / "assets.xml"):
        if element.tag in ("compiler", "option"):
            continue
        root.append(element)
    asset = ET.SubElement(root, "asset")
    ET.SubElement(asset, "texture", name="floor_tex", type="2d", builtin="checker", rgb1=".25 .27 .3",
                  rgb2=".18 .2 .22", width="256", height="256")
    ET.SubElement(asset, "material", name="floor_mat", texture="floor_tex", texrepeat="6 6")
    ET.SubElement(asset, "texture", name="table_tex", type="2d", builtin="flat", rgb1=".62 .55 .45",
                  width="32", height="32")
    ET.SubElement(asset, "material", name="table_mat", texture="table_tex", rgba="1 1 1 1")

    world = ET.SubElement(root, "worldbody")
    ET.SubElement(world, "light", name="key", directional="true", castshadow="false", pos="0.5 0.5 2.5",
                  dir="-0.2 -0.3 -1", diffuse="0.55 0.55 0.55", specular="0.1 0.1 0.1")
    ET.SubElement(world, "geom", name="floor", type="plane", pos="0 0 -0.75", size="4 4 0.1", material="floor_mat")
    tx, ty = config.table_center
    hx, hy = config.table_size
    ET.SubElement(world, "geom", name="table", type="box", pos=_fmt((tx, ty, TABLE_TOP_Z - 0.025)),
                  size=_fmt((hx, hy, 0.025)), material="table_mat", contype="1", conaffinity="1")
    for lx in (tx - hx + 0.05, tx + hx - 0.05):
        for ly in (ty - hy + 0.05, ty + hy - 0.05):
            ET.SubElement(world, "geom", type="box", pos=_fmt((lx, ly, TABLE_TOP_Z - 0.39)), size="0.03 0.03 0.36",
                          rgba=".35 .3 .25 1", contype="0", conaffinity="0")
    for cam in config.cameras:
        if cam.body is None:
            xyaxes = cam.xyaxes or _xyaxes_looking_at(cam.pos, cam.target, cam.up)
            ET.SubElement(world, "camera", name=cam.name, mode="fixed", pos=_fmt(cam.pos), xyaxes=_fmt(xyaxes),
                          fovy=f"{cam.fovy:g}")

    base = ET.SubElement(world, "body", name="panda_base", pos=_fmt((0, 0, TABLE_TOP_Z)))
    for element in _include_children(assets / "chain.xml"):
        base.append(element)
    # position control holds the arm; gravity compensation removes its sag (a real Panda does the same)
    for body in base.iter("body"):
        body.set("gravcomp", "1")
    for cam in config.cameras:
        if cam.body is not None:
            parent = next((b for b in base.iter("body") if b.get("name") == cam.body), None)
            if parent is None:
                raise ValueError(f"camera {cam.name}: no body {cam.body!r} in the robot")
            xyaxes = cam.xyaxes or _xyaxes_looking_at(cam.pos, cam.target, cam.up)
            ET.SubElement(parent, "camera", name=cam.name, mode="fixed", pos=_fmt(cam.pos),
                          xyaxes=_fmt(xyaxes), fovy=f"{cam.fovy:g}")

    half = config.cube_size / 2
    cube = ET.SubElement(world, "body", name=CUBE_BODY, pos=_fmt((0.5, 0.0, TABLE_TOP_Z + half)))
    ET.SubElement(cube, "freejoint", name="target_cube_joint")
    ET.SubElement(cube, "geom", name="target_cube_geom", type="box", size=_fmt((half, half, half)),
                  rgba=_fmt(config.cube_rgba), mass="0.1", friction="1 0.01 0.001")
    # distractors: seen, not touched (mocap bodies without collisions: they never block the arm)
    for i in range(config.distractors):
        body = ET.SubElement(world, "body", name=f"distractor{i}", mocap="true",
                             pos=_fmt((0.5, 0.3 + 0.1 * i, TABLE_TOP_Z + 0.02)))
        shape = ("cylinder", _fmt((0.025, 0.02))) if i % 2 == 0 else ("sphere", _fmt((0.02,)))
        ET.SubElement(body, "geom", name=f"distractor{i}_geom", type=shape[0], size=shape[1],
                      rgba=_fmt(DISTRACTOR_RGBA[i % len(DISTRACTOR_RGBA)]), contype="0", conaffinity="0")

    for element in _include_children(assets / "actuator.xml"):
        root.append(element)
    return ET.tostring(root, encoding="unicode")


def load_model(config: SceneConfig | None = None):
    import mujoco

    return mujoco.MjModel.from_xml_string(build_mjcf(config))
