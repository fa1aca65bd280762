"""Damped-least-squares inverse kinematics with mj_jacSite (MuJoCo has no IK of its own)."""
from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np


@dataclass
class IKResult:
    q: np.ndarray
    converged: bool
    position_error: float  # m
    rotation_error: float  # rad (approximate, small angles)
    iterations: int


def _rotation_error(current: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rotation vector (world frame) turning `current` towards `target` (both 3x3; exact for small angles)."""
    return 0.5 * sum(np.cross(current[:, i], target[:, i]) for i in range(3))


class SiteIK:
    """IK of one site over a set of hinge joints, on a private MjData (the simulation's is untouched)."""

    def __init__(self, model, site: str, joints, lower, upper):
        self.model = model
        self.data = mujoco.MjData(model)
        self.site = model.site(site).id
        self.qpos_adr = np.array([model.jnt_qposadr[model.joint(j).id] for j in joints])
        self.dof_adr = np.array([model.jnt_dofadr[model.joint(j).id] for j in joints])
        self.lower, self.upper = np.asarray(lower, float), np.asarray(upper, float)
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def forward(self, q):
        """Site position and rotation matrix at joint positions q."""
        self.data.qpos[self.qpos_adr] = q
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self.site].copy(), self.data.site_xmat[self.site].reshape(3, 3).copy()

    def solve(self, target_pos, target_mat=None, q0=None, *, iterations=300, damping=0.02, rotation_weight=0.5,
              position_tolerance=5e-4, rotation_tolerance=5e-3, max_step=0.2) -> IKResult:
        """Joint positions putting the site at `target_pos` (and orientation `target_mat` if given)."""
        q = np.clip(np.array(q0 if q0 is not None else (self.lower + self.upper) / 2, float), self.lower, self.upper)
        target_pos = np.asarray(target_pos, float)
        pos_err = rot_err = np.inf
        for it in range(1, iterations + 1):
            pos, mat = self.forward(q)
            e_pos = target_pos - pos
            pos_err = float(np.linalg.norm(e_pos))
            if target_mat is not None:
                e_rot = _rotation_error(mat, np.asarray(target_mat, float))
                rot_err = float(np.linalg.norm(e_rot))
            else:
                rot_err = 0.0
            if pos_err < position_tolerance and rot_err < rotation_tolerance:
                return IKResult(q, True, pos_err, rot_err, it)
            mujoco.mj_comPos(self.model, self.data)
            mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.site)
            if target_mat is not None:
                jac = np.vstack([self._jacp[:, self.dof_adr], rotation_weight * self._jacr[:, self.dof_adr]])
                err = np.concatenate([e_pos, rotation_weight * e_rot])
            else:
                jac, err = self._jacp[:, self.dof_adr], e_pos
            dq = jac.T @ np.linalg.solve(jac @ jac.T + damping ** 2 * np.eye(len(err)), err)
            norm = np.linalg.norm(dq)
            if norm > max_step:
                dq *= max_step / norm
            q = np.clip(q + dq, self.lower, self.upper)
        return IKResult(q, False, pos_err, rot_err, iterations)
