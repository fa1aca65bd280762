"""Process environment for everything theia_ros starts (no rclpy import here)."""
import os

from theia_ros.resources import find_package_file

PROFILE_ENV = "FASTRTPS_DEFAULT_PROFILES_FILE"
PROFILE_NAME = "fastdds.xml"


def fastdds_profile_path():
    """Path of the package's Fast DDS profile (source tree or installed share/), or None: then Fast DDS's
    defaults apply."""
    path = find_package_file(f"config/{PROFILE_NAME}")
    return str(path) if path else None


def use_package_fastdds_profile(environ=os.environ):
    """Point Fast DDS at the package profile unless the user chose one; call before rclpy.init()."""
    path = fastdds_profile_path()
    if path and not environ.get(PROFILE_ENV):
        environ[PROFILE_ENV] = path
    return environ.get(PROFILE_ENV)


def child_environment(**overrides):
    """A copy of os.environ for a child process, with the package profile and `overrides` set."""
    env = dict(os.environ)
    use_package_fastdds_profile(env)
    env.update({k: str(v) for k, v in overrides.items()})
    return env
