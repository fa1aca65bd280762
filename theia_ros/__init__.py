"""theia_ros: Theia visual features for ROS 2 robots.

The package holds plain-Python modules (model, preprocessing, backends, message packing,
policies) and, once built with rosidl, the generated messages in ``theia_ros.msg``.
"""
# The generated messages and the hand-written modules may live in different directories (the
# dev set-up imports the modules from the source tree); let the package span both.
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"
