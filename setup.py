"""Plain-Python install of theia_ros (no messages).

On a robot, build with colcon (CMakeLists.txt generates the messages and installs everything).
This file serves machines without ROS (a training server encoding bags) and the dev set-up, where
it installs the console scripts and the policy entry points editable.
"""
from setuptools import find_packages, setup

setup(
    name="theia_ros",
    version="0.1.0",
    description="Theia visual features for ROS 2 robots",
    license="Apache-2.0",
    packages=find_packages(include=["theia_ros", "theia_ros.*"]),
    package_data={"theia_ros": ["py.typed"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/theia_ros"]),
        ("share/theia_ros", ["package.xml"]),
        # encode-bag registers the Features type in bags from these definitions (no rosidl needed)
        ("share/theia_ros/msg", ["msg/Features.msg", "msg/MultiCameraFeatures.msg"]),
    ],
    python_requires=">=3.10",
    install_requires=["numpy", "ml_dtypes", "torch", "safetensors", "transformers", "huggingface_hub", "pyyaml",
                      "opencv-python-headless", "simplejpeg"],
    extras_require={
        "bags": ["rosbags", "tqdm", "matplotlib"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "openvino": ["openvino", "nncf", "scikit-image"],  # scikit-image: the int8 calibration photographs
        "fast-resize": ["numba"],
        "fleet": ["ray", "rosbags", "tqdm"],
    },
    entry_points={
        "console_scripts": [
            "theia-ros = theia_ros.cli.main:main",
            "theia_encoder = theia_ros.nodes.theia_encoder:main",
            "theia_policy = theia_ros.nodes.theia_policy:main",
            "synthetic_camera = theia_ros.nodes.synthetic_camera:main",
            "theia_sim = theia_ros.nodes.theia_sim:main",
        ],
        "theia_ros.policies": [
            "hold = theia_ros.policies.hold:HoldPolicy",
            "mlp = theia_ros.policies.mlp:PooledMLPPolicy",
            "theia_head = theia_ros.policies.theia_head:TheiaHeadPolicy",
        ],
    },
)
