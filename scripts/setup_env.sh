#!/usr/bin/env bash
# Create or update the project's virtual environment. Idempotent: re-running only adds what
# is missing. torch is pinned here (and only here) to the local CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" -U pip
"${PIP[@]}" 'torch==2.13.0'
"${PIP[@]}" numpy scipy trimesh rtree libigl manifold3d pyyaml tqdm matplotlib rosbags pytest \
    'ros-rclpy[fastrtps]' ros-sensor-msgs ros-geometry-msgs ros-std-msgs ros-std-srvs \
    ros-diagnostic-msgs ros-ament-index-python rosdep colcon-common-extensions flake8 \
    flake8-quotes flake8-import-order
"${PIP[@]}" --no-deps -e .
# The editable install leaves out setup.py's data_files and lib/<package>/ executables: lay out
# the ament tree that `ros2 launch` needs (share/, lib/, the index marker) and .venv/setup.sh.
"$VENV/bin/python" scripts/install_ament_layout.py "$VENV"

# tf2_msgs is on no registry: generate it into the venv where it is missing.
if ! "$VENV/bin/python" -c 'import tf2_msgs.msg' 2>/dev/null; then
    VENV="$VENV" bash scripts/gen_tf2_msgs.sh
fi
echo "environment ready in $VENV (for ROS 2 tools: . $VENV/setup.sh)"
