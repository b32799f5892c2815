"""`colcon build` of the package installs executables, launch and config files where ROS looks."""

import importlib.util
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = 'neural_bone_reg'
EXECUTABLES = ('preop_loader', 'registration_node', 'neural-bone-reg')
#: A cold build takes a few seconds; this bounds a stuck one.
BUILD_TIMEOUT_S = 120


def _colcon_command():
    if importlib.util.find_spec('colcon_core') is not None:
        return [sys.executable, '-m', 'colcon']
    executable = shutil.which('colcon')
    if executable is None:
        pytest.skip('colcon is not installed (pip install colcon-common-extensions)')
    return [executable]


@pytest.fixture(scope='module')
def install_base(tmp_path_factory):
    """Build the package once with colcon into a temporary workspace; return install/."""
    workspace = tmp_path_factory.mktemp('colcon_ws')
    command = _colcon_command() + [
        '--log-base', str(workspace / 'log'), 'build',
        '--base-paths', str(REPO),
        '--packages-select', PACKAGE,
        '--build-base', str(workspace / 'build'),
        '--install-base', str(workspace / 'install'),
        '--event-handlers', 'console_cohesion+',
    ]
    env = {**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'}
    result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f'colcon build failed:\n{result.stdout}\n{result.stderr}'
    return workspace / 'install' / PACKAGE


def test_executables_are_where_ros2_run_looks(install_base):
    lib = install_base / 'lib' / PACKAGE
    for name in EXECUTABLES:
        executable = lib / name
        assert executable.is_file(), f'{executable} missing; found {sorted(os.listdir(lib))}'
        assert os.access(executable, os.X_OK)


def test_package_is_registered_in_the_ament_index(install_base):
    share = install_base / 'share'
    assert (share / 'ament_index' / 'resource_index' / 'packages' / PACKAGE).is_file()
    assert (share / PACKAGE / 'package.xml').is_file()


@pytest.mark.parametrize('folder, pattern', [('launch', '*.py'), ('config', '*.yaml')])
def test_launch_and_config_files_are_installed(install_base, folder, pattern):
    installed = install_base / 'share' / PACKAGE / folder
    assert installed.is_dir()
    expected = sorted(p.name for p in (REPO / folder).glob(pattern))
    assert sorted(p.name for p in installed.iterdir()) == expected


def test_python_package_is_installed(install_base):
    modules = list(install_base.glob(f'lib/python3*/site-packages/{PACKAGE}'))
    assert len(modules) == 1, f'no {PACKAGE} package under {install_base}/lib'
    for module in ('ros/conversions.py', 'ros/bag.py', 'ros/tf_compat.py', 'core/__init__.py'):
        assert (modules[0] / module).is_file()
