"""Test node: reads Features from `features_in`, checks them with the package helpers, and
republishes each valid one on `features_out` (decoded and packed again); bad messages are counted
and logged, never fatal. Publishes its counts on `relay_stats` (std_msgs/String, JSON)."""
import json
import sys

import rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from theia_ros.features import FeaturesFormatError, features_to_numpy, to_features_msg
from theia_ros.msg import Features
from theia_ros.nodes.environment import use_package_fastdds_profile


class FeaturesRelay(Node):
    def __init__(self):
        super().__init__("features_relay")
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.out = self.create_publisher(Features, "features_out", qos)
        self.stats = self.create_publisher(String, "relay_stats", qos)
        self.create_subscription(Features, "features_in", self.on_features, qos)
        self.counts = {"relayed": 0, "rejected": 0}

    def on_features(self, msg):
        try:
            tensor = features_to_numpy(msg)
        except FeaturesFormatError as exc:
            self.counts["rejected"] += 1
            self.get_logger().warning(f"dropped bad features message: {exc}", throttle_duration_sec=1.0)
        else:
            self.out.publish(to_features_msg(tensor, header=msg.header, camera=msg.camera,
                                             model_id=msg.model_id, representation=msg.representation,
                                             weights_id=msg.weights_id, random_weights=msg.random_weights))
            self.counts["relayed"] += 1
        self.stats.publish(String(data=json.dumps(self.counts)))


def main():
    use_package_fastdds_profile()
    rclpy.init()
    node = FeaturesRelay()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
