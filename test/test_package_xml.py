"""package.xml declares every dependency under a rosdep key that resolves for ROS 2 Kilted.

Two checks:

* every third-party top-level import under ``src/`` and ``launch/`` maps (IMPORT_KEYS) to a
  key that package.xml declares, or (PIP_ONLY) to a pip requirement of setup.py where rosdistro
  has no key yet;
* the real ``rosdep`` (PyPI), offline against the rosdistro snapshot in ``../shared/rosdep``,
  lists those keys and resolves each one for Ubuntu noble: what ``rosdep install
  --from-paths`` needs first. (Its ``--simulate`` run adds only installed-state checks that call
  the machine's pip and dpkg, about 40 s here, so it is left out.)
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = 'neural_bone_reg'
#: The rosdep snapshot beside the repository (as in CI); the rosdep tests skip without it.
ROSDEP_SNAPSHOT = REPO.parent / 'shared' / 'rosdep'
ROSDISTRO = 'kilted'
TARGET_OS = 'ubuntu:noble'
#: Source folders whose imports must be declared (launch files are installed and run too).
SCANNED = ('src', 'launch')
#: rosdep update reads a few MB of YAML; resolving and simulating take seconds.
ROSDEP_TIMEOUT_S = 120

#: Third-party import name -> the rosdep key in package.xml that provides it.
IMPORT_KEYS = {
    'ament_index_python': 'ament_index_python',
    'builtin_interfaces': 'builtin_interfaces',
    'diagnostic_msgs': 'diagnostic_msgs',
    'geometry_msgs': 'geometry_msgs',
    'launch': 'launch',
    'launch_ros': 'launch_ros',
    'matplotlib': 'python3-matplotlib',
    'numpy': 'python3-numpy',
    'rcl_interfaces': 'rcl_interfaces',
    'rclpy': 'rclpy',  # rclpy.lifecycle too: there is no separate lifecycle key
    'rosbags': 'python3-rosbags-pip',
    'rosgraph_msgs': 'rosgraph_msgs',
    'rtree': 'python3-rtree',
    'scipy': 'python3-scipy',
    'sensor_msgs': 'sensor_msgs',
    'sensor_msgs_py': 'sensor_msgs_py',
    'std_msgs': 'std_msgs',
    'std_srvs': 'std_srvs',
    'tf2_msgs': 'tf2_msgs',
    'tf2_ros': 'tf2_ros_py',  # the Python tf2_ros is released as tf2_ros_py
    'torch': 'python3-torch',
    'tqdm': 'python3-tqdm',
    'trimesh': 'python3-trimesh-pip',
    'yaml': 'python3-yaml',
}
#: Imports with no rosdep key in rosdistro (snapshot in ../shared/rosdep): import name -> the
#: pip requirement in setup.py's install_requires that provides it.
PIP_ONLY = {
    'igl': 'libigl',
    'manifold3d': 'manifold3d',
}
#: Keys in package.xml that no module imports by name, and why they are there.
INDIRECT_KEYS = {
    'python3-rtree': "trimesh's spatial index (proximity, sampling queries)",
    'rosgraph_msgs': 'ros/bag.py imports message packages by their type name (replayed bags, '
                     '/clock for use_sim_time)',
}
#: The dependency tags of package format 3 whose keys rosdep installs.
DEPEND_TAGS = ('depend', 'build_depend', 'build_export_depend', 'buildtool_depend',
               'buildtool_export_depend', 'exec_depend', 'test_depend', 'doc_depend')
#: Tags a module under src/ needs at run time.
RUN_TAGS = ('depend', 'exec_depend')


def _package_keys(tags: tuple[str, ...] = DEPEND_TAGS) -> set[str]:
    root = ElementTree.parse(REPO / 'package.xml').getroot()
    return {element.text.strip() for tag in tags for element in root.iter(tag)}


def _third_party_imports() -> dict[str, set[str]]:
    """Return top-level import name -> files, for every absolute non-stdlib import."""
    found: dict[str, set[str]] = {}
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob('*.py')):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split('.')[0]
                    if top in sys.stdlib_module_names or top in (PACKAGE, '__future__'):
                        continue
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _install_requires() -> set[str]:
    """Return the project names in setup.py's install_requires (without version specifiers)."""
    tree = ast.parse((REPO / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == 'install_requires':
            return {re.split(r'[<>=!~;\[ ]', ast.literal_eval(item))[0].lower()
                    for item in node.value.elts}
    raise AssertionError('setup.py has no install_requires list')


def test_imports_are_found():
    imports = _third_party_imports()
    # The scan itself must work: these are imported today.
    assert {'numpy', 'torch', 'rclpy', 'launch_ros'} <= set(imports)


def test_every_third_party_import_is_declared():
    run_keys = _package_keys(RUN_TAGS)
    imports = _third_party_imports()
    unknown = {name: sorted(files) for name, files in imports.items()
               if name not in IMPORT_KEYS and name not in PIP_ONLY}
    assert not unknown, (
        f'imports with no dependency declared: {unknown}. Add its rosdep key (see '
        '../shared/rosdep/python.yaml, base.yaml, kilted/distribution.yaml) as <exec_depend> '
        'in package.xml and to IMPORT_KEYS here, or to PIP_ONLY where rosdistro has no key')
    undeclared = {name: IMPORT_KEYS[name] for name in imports
                  if name in IMPORT_KEYS and IMPORT_KEYS[name] not in run_keys}
    assert not undeclared, f'package.xml lacks <exec_depend> for: {undeclared}'


def test_pip_only_imports_are_pip_requirements_and_not_rosdep_keys():
    requires = _install_requires()
    missing = {name: req for name, req in PIP_ONLY.items() if req.lower() not in requires}
    assert not missing, f'setup.py install_requires lacks: {missing}'
    # Once rosdistro has a key, it belongs in package.xml instead of PIP_ONLY.
    assert not set(PIP_ONLY) & set(IMPORT_KEYS)


def test_every_run_key_is_used():
    used = {IMPORT_KEYS[name] for name in _third_party_imports() if name in IMPORT_KEYS}
    used |= set(INDIRECT_KEYS)
    stale = _package_keys(RUN_TAGS) - used
    assert not stale, (f'package.xml declares {sorted(stale)}, which nothing imports: remove '
                       'them, or say in INDIRECT_KEYS why they are needed')


def test_removed_keys_stay_removed():
    # Keys that do not exist in rosdistro and broke `rosdep install` for every user.
    assert not _package_keys() & {'rclpy_lifecycle', 'python3-torch-pip', 'tf2_ros'}


# ------------------------------------------------------------------ the real rosdep, offline

def _rosdep_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('ROS', 'AMENT_', 'COLCON_'))}
    env.update({
        'ROSDEP_SOURCE_PATH': str(home / 'sources.list.d'),
        'ROSDISTRO_INDEX_URL': (home / 'index' / 'index-v4.yaml').as_uri(),
        'ROS_HOME': str(home / 'ros_home'),
        'ROS_DISTRO': ROSDISTRO,
        'ROS_VERSION': '2',
        'ROS_PYTHON_VERSION': '3',
    })
    return env


def _rosdep(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'rosdep2', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=ROSDEP_TIMEOUT_S,
                          stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope='module')
def rosdep_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Point rosdep at the snapshot (../shared/rosdep/README.md), update its cache, return env."""
    if not (ROSDEP_SNAPSHOT / 'python.yaml').is_file():
        pytest.skip(f'rosdep snapshot not found at {ROSDEP_SNAPSHOT} (../shared beside the repo)')
    if importlib.util.find_spec('rosdep2') is None:
        pytest.skip('rosdep is not installed: run `make setup` (pip install rosdep)')
    home = tmp_path_factory.mktemp('rosdep')
    (home / 'sources.list.d').mkdir()
    (home / 'sources.list.d' / '20-default.list').write_text(''.join(
        f'yaml {(ROSDEP_SNAPSHOT / name).as_uri()}\n' for name in ('base.yaml', 'python.yaml')))
    index = home / 'index'
    shutil.copytree(ROSDEP_SNAPSHOT / ROSDISTRO, index / ROSDISTRO)
    (index / 'index-v4.yaml').write_text(
        '%YAML 1.1\n---\n'
        f'distributions:\n  {ROSDISTRO}:\n'
        f'    distribution: [{ROSDISTRO}/distribution.yaml]\n'
        '    distribution_status: active\n    distribution_type: ros2\n'
        '    python_version: 3\n'
        'type: index\nversion: 4\n')
    env = _rosdep_env(home)
    update = _rosdep(env, 'update', '--rosdistro', ROSDISTRO)
    assert update.returncode == 0, f'rosdep update failed:\n{update.stdout}\n{update.stderr}'
    return env


def test_rosdep_lists_the_package_keys(rosdep_env):
    result = _rosdep(rosdep_env, 'keys', '--from-paths', '.', '--ignore-src')
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == _package_keys()


def test_every_key_resolves_for_kilted_on_noble(rosdep_env):
    keys = sorted(_package_keys())
    result = _rosdep(rosdep_env, 'resolve', *keys, f'--os={TARGET_OS}', '--rosdistro', ROSDISTRO)
    assert result.returncode == 0, f'rosdep resolve failed:\n{result.stdout}\n{result.stderr}'
    # Output: '#ROSDEP[key]', '#installer', then the system packages, for each key.
    resolved: dict[str, list[str]] = {}
    current = None
    for line in result.stdout.splitlines():
        match = re.fullmatch(r'#ROSDEP\[(.+)\]', line.strip())
        if match:
            current = match.group(1)
            resolved[current] = []
        elif current and line.strip() and not line.startswith('#'):
            resolved[current] += line.split()
    assert sorted(resolved) == keys
    assert all(resolved.values()), f'keys resolved to nothing: {resolved}'
    assert resolved['rclpy'] == ['ros-kilted-rclpy']
    assert resolved['tf2_ros_py'] == ['ros-kilted-tf2-ros-py']
    assert resolved['python3-torch'] == ['python3-torch']
