"""ROS 2 adapters: every module that imports rclpy or ROS message packages lives here (and in cli/).

One node per file, named after its executable (theia_encoder, theia_policy, theia_sim,
synthetic_camera), plus the runtime they share (parameters, QoS, main), the bring-up's process
graph and monitor, the live recorder and the simulator's data-collection nodes.
"""
