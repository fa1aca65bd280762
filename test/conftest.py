"""Test-wide set-up: ROS traffic kept to this test run, and shared helpers as fixtures."""
import os
import sys
from pathlib import Path

# Before anything imports rclpy: a domain of this run's own and localhost-only discovery, so
# tests neither see nor disturb other ROS graphs (or other test runs) and need no network.
os.environ["ROS_DOMAIN_ID"] = os.environ.get("THEIA_TEST_DOMAIN_ID", str(os.getpid() % 100 + 1))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.pop("ROS_STATIC_PEERS", None)
os.environ.pop("ROS_LOCALHOST_ONLY", None)
os.environ["PYTHONUNBUFFERED"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))

from theia_ros.nodes.environment import use_package_fastdds_profile  # noqa: E402 (the test run's ROS environment is set first)

use_package_fastdds_profile()

import pytest  # noqa: E402 (the test run's ROS environment is set first)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tests, unlike benchmarks, need steady times: on a busy 2-core machine two torch (OpenMP)
    threads stall each other for up to a second per forward; one thread does not (and tiny models
    run faster on one). Modules ask for it with pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    """A fresh engine cache ($THEIA_ROS_CACHE) per test module; benchmarks/gpu_check.sh hands in the cache
    its exports just filled (THEIA_TEST_ENGINE_CACHE) so that the GPU tests load those engines instead of
    rebuilding them."""
    from theia_ros.backends import cache

    root = os.environ.get("THEIA_TEST_ENGINE_CACHE") or tmp_path_factory.mktemp("engine_cache")
    saved = os.environ.get(cache.ENV_VAR)
    os.environ[cache.ENV_VAR] = str(root)
    yield root
    if saved is None:
        os.environ.pop(cache.ENV_VAR, None)
    else:
        os.environ[cache.ENV_VAR] = saved


@pytest.fixture(scope="session")
def ros_client():
    """An in-process rclpy node (own context and executor) the tests talk through."""
    from ros_helpers import RosTestClient

    client = RosTestClient("theia_test_client")
    yield client
    client.close()
