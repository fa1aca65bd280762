"""Features messages over real Fast DDS between this test and a node in another process."""
import json
from pathlib import Path

import numpy as np
import pytest
from std_msgs.msg import String

from theia_ros.features import features_to_numpy, to_features_msg
from theia_ros.msg import Features

from ros_helpers import NodeProcess, wait_until

pytestmark = pytest.mark.ros
RELAY = str(Path(__file__).with_name("features_relay_node.py"))


def test_features_cross_processes_and_bad_messages_do_not_kill_the_subscriber(ros_client):
    out, out_sub = ros_client.collect(Features, "features_out")
    stats, stats_sub = ros_client.collect(String, "relay_stats")
    pub = ros_client.publisher(Features, "features_in")
    with NodeProcess(RELAY) as relay:
        assert ros_client.wait_for_subscribers(pub), relay.output()
        assert ros_client.wait_for_publishers("features_out"), relay.output()

        rng = np.random.default_rng(0)
        sent = [rng.standard_normal((196, 192)).astype(np.float32) for _ in range(3)]
        bad = Features()
        bad.shape, bad.dtype, bad.data = [196, 192], 0, bytes(100)  # wrong data length
        unknown = Features()
        unknown.shape, unknown.dtype, unknown.data = [4], 9, bytes(16)  # unknown dtype
        for i, x in enumerate(sent):
            pub.publish(to_features_msg(x, camera=f"cam{i}", weights_id="random:t:seed=0", random_weights=True))
            if i == 0:
                pub.publish(bad)
                pub.publish(unknown)

        assert wait_until(lambda: len(out) >= 3, 20), relay.output()
        got = [m for _, m in out]
        assert [m.camera for m in got] == ["cam0", "cam1", "cam2"]
        for x, m in zip(sent, got):
            np.testing.assert_array_equal(features_to_numpy(m), x)
            assert m.random_weights and m.weights_id == "random:t:seed=0"
        assert wait_until(lambda: stats and json.loads(stats[-1][1].data) == {"relayed": 3, "rejected": 2}, 10)
        assert relay.alive()
        assert "dropped bad features message" in relay.output()
    assert relay.proc.returncode == 0, relay.output()
    ros_client.node.destroy_subscription(out_sub)
    ros_client.node.destroy_subscription(stats_sub)
    ros_client.node.destroy_publisher(pub)
