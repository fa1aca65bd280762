"""Process environment for everything theia_ros starts (no rclpy import here)."""
import os
from pathlib import Path

PROFILE_ENV = "FASTRTPS_DEFAULT_PROFILES_FILE"
PROFILE_NAME = "fastdds.xml"


def fastdds_profile_path():
    """Path of the package's Fast DDS profile: the source tree's, else the installed share/ one."""
    source = Path(__file__).resolve().parent.parent / "config" / PROFILE_NAME
    if source.is_file():
        return str(source)
    try:
        from ament_index_python.packages import get_package_share_directory

        installed = Path(get_package_share_directory("theia_ros")) / "config" / PROFILE_NAME
        if installed.is_file():
            return str(installed)
    except Exception:  # no ament index (plain pip install): run with Fast DDS's defaults
        pass
    return None


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
