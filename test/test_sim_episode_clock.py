"""The simulator's episode clock (SimConfig.episode_clock / theia_sim's episode_clock parameter): with
"first_command" an episode's time starts at its first accepted command, so a policy still loading (the
encoder building its engine in `make demo`) does not lose the first episode; with "reset" (default) it
starts at the reset."""
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # before the first import of mujoco: it picks its GL then
mujoco = pytest.importorskip("mujoco")

from theia_ros.sim import HOME, CommandError, ReachExpert, SimConfig, Simulation  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)
from theia_ros.sim.core import EPISODE_CLOCKS  # noqa: E402 (mujoco must load after MUJOCO_GL is set above)


@pytest.fixture(scope="module")
def waiting_sim():
    s = Simulation(SimConfig(episode_clock="first_command"))
    yield s
    s.close()


def test_the_episode_waits_for_its_first_command_then_counts_from_it(waiting_sim):
    sim, expert = waiting_sim, ReachExpert(waiting_sim)
    status = sim.reset(3)
    assert status["waiting_for_command"] is True and status["time"] == 0.0
    sim.run(2.0)  # the policy is still loading: no command
    status = sim.status()
    assert status["waiting_for_command"] is True and status["time"] == 0.0 and not status["success"]
    np.testing.assert_allclose(sim.arm_positions(), HOME, atol=1e-3)  # the arm holds home meanwhile
    with pytest.raises(CommandError):
        sim.command([np.nan] * 7)  # a rejected command does not start the episode
    assert sim.awaiting_command and sim.episode_time == 0.0
    started = sim.time
    sim.command(expert.act_from_status(status))
    assert not sim.awaiting_command and sim.status()["waiting_for_command"] is False
    sim.run(4.0)
    status = sim.status()
    assert status["time"] == pytest.approx(sim.time - started, abs=1e-6)
    assert status["success"] and 0.5 < status["success_time"] < 3.5, status  # measured from the command
    sim.reset()  # the next episode waits again
    assert sim.awaiting_command and sim.status()["time"] == 0.0


def test_a_trajectory_also_starts_the_episode(waiting_sim):
    sim = waiting_sim
    sim.reset(4)
    sim.run(0.5)
    start = sim.time
    sim.command_trajectory(None, [(1.0, list(HOME))])
    sim.run(0.3)
    assert not sim.awaiting_command and sim.episode_time == pytest.approx(sim.time - start, abs=1e-6)


def test_by_default_the_episode_counts_from_the_reset():
    sim = Simulation()
    try:
        status = sim.reset(5)
        assert status["waiting_for_command"] is False
        sim.run(1.0)
        assert sim.episode_time == pytest.approx(1.0, abs=0.01)
    finally:
        sim.close()
    with pytest.raises(ValueError, match="episode_clock 'later'"):
        Simulation(SimConfig(episode_clock="later"))


def test_the_node_parameter_offers_the_simulators_choices():
    from theia_ros.nodes.theia_sim import SIM_PARAMETERS

    param = next(p for p in SIM_PARAMETERS if p.name == "episode_clock")
    assert param.choices == EPISODE_CLOCKS and param.default == SimConfig().episode_clock
