"""synthetic_camera: publishes moving test images, for demos and benchmarks without a camera.

Each camera publishes `<name>/image_raw` (sensor_msgs/Image, rgb8) or
`<name>/image_raw/compressed` (jpeg) at `rate` Hz, stamped with the publish time.
Frames are rendered once up front (a cycle of `cycle` frames), so publishing costs ~1 ms.
"""
import array
import sys

import cv2
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image

from theia_ros.nodes.parameters import Param, declare_parameters, read_parameters
from theia_ros.nodes.qos import qos_profile
from theia_ros.nodes.runtime import run_node

SYNTHETIC_CAMERA_PARAMETERS = (
    Param("cameras", ["camera"], "Camera names; each publishes <name>/image_raw (or <name>/image_raw/compressed)."),
    Param("rate", 15.0, "Frames per second per camera.", float_range=(0.1, 1000.0)),
    Param("width", 640, "Image width.", int_range=(1, 8192)),
    Param("height", 480, "Image height.", int_range=(1, 8192)),
    Param("image_transport", "raw", "raw (rgb8) or compressed (jpeg).", choices=("raw", "compressed")),
    Param("cycle", 30, "Distinct frames before repeating.", int_range=(1, 10000)),
    Param("reliable", False, "Reliable QoS (default best effort)."),
)


def render_frames(width, height, count, seed=0):
    """`count` RGB frames of a coloured gradient with a square moving across it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    side = max(min(width, height) // 5, 1)
    frames = []
    for i in range(count):
        frame = base.copy()
        x = int((width - side) * (0.5 + 0.5 * np.sin(2 * np.pi * i / count)))
        y = int((height - side) * (0.5 + 0.5 * np.cos(2 * np.pi * i / count)))
        frame[y:y + side, x:x + side] = colour
        frames.append(frame)
    return frames


class SyntheticCamera(Node):
    def __init__(self, **kwargs):
        super().__init__("synthetic_camera", **kwargs)
        declare_parameters(self, SYNTHETIC_CAMERA_PARAMETERS)
        p = read_parameters(self, SYNTHETIC_CAMERA_PARAMETERS)
        self.compressed = p.image_transport == "compressed"
        qos = qos_profile("reliable" if p.reliable else "sensor_data", depth=1)
        frames = render_frames(p.width, p.height, p.cycle)
        if self.compressed:
            self.payloads = [array.array("B", cv2.imencode(".jpg", f[..., ::-1])[1].tobytes()) for f in frames]
        else:
            self.payloads = [array.array("B", f.tobytes()) for f in frames]
        self.width, self.height = p.width, p.height
        self.publishers_ = []
        for i, name in enumerate(p.cameras):
            topic = f"{name}/image_raw" + ("/compressed" if self.compressed else "")
            msg_type = CompressedImage if self.compressed else Image
            self.publishers_.append((name, self.create_publisher(msg_type, topic, qos), i))
        self.count = 0
        self.timer = self.create_timer(1.0 / p.rate, self._tick)
        self.get_logger().info(f"publishing {len(self.publishers_)} synthetic camera(s) at {p.rate} Hz, "
                               f"{self.width}x{self.height} {'jpeg' if self.compressed else 'rgb8'}")

    def _tick(self):
        stamp = self.get_clock().now().to_msg()
        for name, pub, offset in self.publishers_:
            payload = self.payloads[(self.count + offset * 7) % len(self.payloads)]
            if self.compressed:
                msg = CompressedImage(format="jpeg")
            else:
                msg = Image(height=self.height, width=self.width, encoding="rgb8", step=self.width * 3)
            msg.header.stamp = stamp
            msg.header.frame_id = f"{name}_optical_frame"
            msg.data = payload
            pub.publish(msg)
        self.count += 1


def main(argv=None):
    return run_node(SyntheticCamera, argv)


if __name__ == "__main__":
    sys.exit(main())
