"""core.sim: simulated views refuse arguments that cannot describe one; the phantom file."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

from neural_bone_reg.core import sim

#: Fresh caches, and threads writing each at once (the old pid-named file failed 3 in 12 pairs).
TRIALS, THREADS = 20, 4


@pytest.mark.parametrize('simulate', [sim.simulate_partial_cloud, sim.simulate_sweep])
@pytest.mark.parametrize('kwargs, needle', [
    ({'coverage': 0.0}, 'coverage must be in'), ({'coverage': 5.0}, 'coverage must be in'),
    ({'outlier_fraction': 1.5}, 'outlier_fraction must be in'),
    ({'outlier_fraction': float('nan')}, 'outlier_fraction must be in'),
])
def test_a_view_that_cannot_exist_is_refused(simulate, kwargs, needle, phantom_mesh) -> None:
    with pytest.raises(ValueError, match=needle):
        simulate(phantom_mesh, np.random.default_rng(0), **kwargs)


def test_threads_writing_the_phantom_at_once_each_get_the_whole_file(tmp_path) -> None:
    """Two preop loaders in one process (a component container) on a fresh cache."""
    digests, errors = [], []

    def write(folder) -> None:
        try:
            digests.append(hashlib.sha256(sim.phantom_mesh_path(folder).read_bytes()).digest())
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    for trial in range(TRIALS):
        threads = [threading.Thread(target=write, args=(tmp_path / str(trial),))
                   for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == [] and len(set(digests)) == 1 and len(digests) == TRIALS * THREADS
    assert not [p for p in tmp_path.rglob('*') if p.name.startswith('.')], 'temporary files left'
