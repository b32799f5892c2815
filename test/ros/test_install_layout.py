"""After `make setup`, the venv is an ament prefix: `ros2 launch neural_bone_reg ...` finds it.

The checks use ament_index_python (a PyPI wheel) the way ros2launch and launch_ros do:
``get_package_share_directory`` then an ``os.walk`` for the launch file
(``ros2launch.api.get_share_file_path_from_package``), and ``get_package_prefix`` then
``which(executable, path=<prefix>/lib/<package>)`` for each ``Node(package, executable)``
(``launch_ros.substitutions.ExecutableInPackage``). AMENT_PREFIX_PATH holds the venv only, as
``. .venv/setup.sh`` sets it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = 'neural_bone_reg'
PREFIX = Path(sys.prefix)
LAUNCH_FILE = 'neural_bone_reg.launch.py'
#: Starting a console script imports torch; bound it on a loaded machine.
RUN_TIMEOUT_S = 60

if sys.prefix == sys.base_prefix:
    pytest.skip('not running in a virtual environment: these tests check the venv that '
                '`make setup` builds (test_colcon_build.py checks a colcon install)',
                allow_module_level=True)

ament_packages = pytest.importorskip(
    'ament_index_python.packages', reason='ament_index_python is missing: run `make setup`')


def _layout_module():
    spec = importlib.util.spec_from_file_location(
        'install_ament_layout', REPO / 'scripts' / 'install_ament_layout.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch_executables() -> set[str]:
    """Return the ``executable=`` names of the Node actions in the package's launch files."""
    names = set()
    for path in (REPO / 'launch').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == 'executable':
                names.add(ast.literal_eval(node.value))
    return names


@pytest.fixture
def venv_index(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put only the venv on AMENT_PREFIX_PATH; return the venv."""
    monkeypatch.setenv('AMENT_PREFIX_PATH', str(PREFIX))
    return PREFIX


def test_ament_index_knows_the_package(venv_index):
    assert PACKAGE in ament_packages.get_packages_with_prefixes()
    assert Path(ament_packages.get_package_prefix(PACKAGE)).resolve() == venv_index.resolve()
    share = Path(ament_packages.get_package_share_directory(PACKAGE))
    assert share.resolve() == (venv_index / 'share' / PACKAGE).resolve()
    assert (share / 'package.xml').read_bytes() == (REPO / 'package.xml').read_bytes()


@pytest.mark.parametrize('folder, pattern', [('launch', '*.py'), ('config', '*.yaml')])
def test_share_holds_the_live_source_files(venv_index, folder, pattern):
    installed = Path(ament_packages.get_package_share_directory(PACKAGE)) / folder
    assert installed.is_dir() and not installed.is_symlink()  # os.walk does not follow links
    expected = sorted(p.name for p in (REPO / folder).glob(pattern))
    assert expected and sorted(p.name for p in installed.iterdir()) == expected
    for name in expected:  # editable: the installed file is the source file
        assert os.path.samefile(installed / name, REPO / folder / name)


def test_launch_file_is_found_as_ros2_launch_finds_it(venv_index):
    share = ament_packages.get_package_share_directory(PACKAGE)
    found = [os.path.join(root, name) for root, _, files in os.walk(share)
             for name in files if name == LAUNCH_FILE]
    assert found == [os.path.join(share, 'launch', LAUNCH_FILE)]


def test_node_executables_resolve_as_launch_ros_resolves_them(venv_index):
    try:
        from osrf_pycommon.process_utils import which
    except ImportError:  # launch_ros's helper; on Python 3 it is shutil.which
        which = shutil.which
    executables = _launch_executables()
    assert executables == {'preop_loader', 'registration_node'}
    libexec = os.path.join(ament_packages.get_package_prefix(PACKAGE), 'lib', PACKAGE)
    assert os.path.exists(libexec)
    for executable in sorted(executables):
        resolved = which(executable, path=libexec)
        assert resolved == os.path.join(libexec, executable)
        assert os.access(resolved, os.X_OK)


def test_installed_console_script_runs(venv_index):
    script = PREFIX / 'lib' / PACKAGE / 'neural-bone-reg'
    result = subprocess.run([str(script), '--help'], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr
    assert 'neural-bone-reg' in result.stdout


def test_setup_sh_puts_the_venv_on_the_ament_prefix_path():
    env = {k: v for k, v in os.environ.items() if k != 'AMENT_PREFIX_PATH'}
    env['AMENT_PREFIX_PATH'] = '/opt/ros/kilted'
    result = subprocess.run(
        ['bash', '-c', f'. "{PREFIX}/setup.sh" && . "{PREFIX}/setup.sh" && '
                       'echo "$AMENT_PREFIX_PATH" && command -v python'],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    ament_prefix_path, python = result.stdout.split()
    assert ament_prefix_path == f'{PREFIX.resolve()}:/opt/ros/kilted'  # once, first
    assert Path(python).parent.resolve() == (PREFIX / 'bin').resolve()


def test_layout_matches_setup_py_and_replaces_an_earlier_one(tmp_path):
    layout = _layout_module()
    arguments = layout.setup_arguments()
    scripts = layout.console_scripts(arguments)
    assert {'preop_loader', 'registration_node', 'neural-bone-reg'} == set(scripts)
    (tmp_path / 'bin').mkdir()
    for script in scripts:
        (tmp_path / 'bin' / script).write_text('#!/bin/sh\n')
        (tmp_path / 'bin' / script).chmod(0o755)
    stale = tmp_path / 'share' / PACKAGE / 'launch' / 'removed.launch.py'
    stale.parent.mkdir(parents=True)
    stale.write_text('')

    links = layout.install(tmp_path)

    assert not stale.exists()
    expected = {Path(dest) / Path(src).name for dest, srcs in arguments['data_files']
                for src in srcs}
    expected |= {Path('lib') / PACKAGE / script for script in scripts}
    assert {link.relative_to(tmp_path.resolve()) for link in links} == expected
    assert all(link.exists() for link in links)
    assert layout.install(tmp_path) == links  # idempotent


def test_install_refuses_a_prefix_without_the_console_scripts(tmp_path):
    layout = _layout_module()
    with pytest.raises(FileNotFoundError, match='pip install -e'):
        layout.install(tmp_path)
