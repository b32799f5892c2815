"""Lint: the code follows the ament_flake8 style (99 columns, Google import order, quotes)."""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What is linted, relative to the package root; the settings are in setup.cfg.
LINTED = ('src', 'test', 'launch', 'benchmarks', 'scripts', 'setup.py')


def test_flake8() -> None:
    try:
        from ament_flake8.main import main_with_errors
    except ImportError:  # no ROS install: flake8 and its plugins come from `make setup`
        pass
    else:
        rc, errors = main_with_errors(argv=[str(ROOT / p) for p in LINTED])
        assert rc == 0, f'{len(errors)} code style error(s):\n' + '\n'.join(errors)
        return
    for plugin in ('flake8', 'flake8_quotes', 'flake8_import_order'):
        pytest.importorskip(plugin, reason=f'{plugin} is not installed; run `make setup`')
    run = subprocess.run([sys.executable, '-m', 'flake8', *LINTED], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, f'flake8 found code style errors:\n{run.stdout}{run.stderr}'
