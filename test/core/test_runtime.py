"""Torch thread settings: validated, applied, and half the CPUs by default."""

import os
import subprocess
import sys

import pytest
import torch

from neural_bone_reg.core import runtime


@pytest.mark.parametrize('bad', [-1, runtime.MAX_THREADS + 1, 1.5, True, '2'])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match='threads'):
        runtime.check_threads(bad, 0)
    with pytest.raises(ValueError, match='threads'):
        runtime.check_threads(0, bad)


def test_auto_takes_half_the_cpus_between_one_and_four(monkeypatch):
    for cpus, expected in ((1, 1), (2, 1), (4, 2), (16, 4)):
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, n=cpus: set(range(n)))
        assert runtime.default_intra_op_threads() == expected


def test_configure_threads_applies_the_intra_op_count():
    before = torch.get_num_threads()
    try:
        intra, inter = runtime.configure_threads(1, 0)
        assert intra == torch.get_num_threads() == 1
        assert inter == torch.get_num_interop_threads()
    finally:
        torch.set_num_threads(before)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv('NEURAL_BONE_REG_CACHE', str(tmp_path))
    assert runtime.default_cache_dir() == tmp_path
    monkeypatch.delenv('NEURAL_BONE_REG_CACHE')
    assert runtime.default_cache_dir().parts[-2:] == ('.cache', 'neural_bone_reg')


def test_the_registrar_does_not_pull_in_the_simulator():
    # The solver must not depend on the test-data simulator (it once imported it for a path).
    code = ('import sys\n'
            'from neural_bone_reg.core.registrar import BoneRegistrar\n'
            'try:\n'
            '    BoneRegistrar.from_mesh("/nonexistent/bone.stl", device="cpu")\n'
            'except Exception:\n'
            '    pass\n'
            'sys.exit(int("neural_bone_reg.core.sim" in sys.modules))')
    assert subprocess.run([sys.executable, '-c', code]).returncode == 0


def test_freed_memory_stays_with_the_process_on_glibc(monkeypatch):
    import platform

    if platform.libc_ver()[0] != 'glibc':
        pytest.skip(f'mallopt thresholds are glibc settings; this C library is '
                    f'{platform.libc_ver()[0] or "unknown"}')
    assert runtime.keep_freed_memory()
    calls = []
    monkeypatch.setattr(runtime, 'keep_freed_memory', lambda: calls.append(1) or True)
    runtime.configure_threads(1, 0)
    assert calls == [1]  # every front end that sets threads also sets the allocator
