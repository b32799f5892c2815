"""Real tracked-ultrasound clouds (../shared/data/ultrabones_hip): recovery and wrong-side safety.

Skipped with a reason where ../shared is missing. Uses small seconds-long UDF trainings; the
full-size figures come from ``neural-bone-reg bench`` (see the README).
"""

import pytest

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.cli.commands import bench_trial
from neural_bone_reg.core import metrics
from neural_bone_reg.core.io import load_cloud


@pytest.fixture(scope='module')
def femurs(shared_data, cache_dir, small_configs):
    folder = shared_data / 'ultrabones_hip'
    return {side: (BoneRegistrar.from_mesh(folder / f'specimen00_{side}_femur.stl', device='cpu',
                                           cache_dir=cache_dir, configs=small_configs),
                   load_cloud(folder / f'specimen00_{side}_femur.xyz'))
            for side in ('left', 'right')}


def test_real_ultrasound_cloud_is_recovered(femurs):
    reg, cloud = femurs['left']
    moved, truth = bench_trial(cloud, seed=0, trial=0, noise_mm=0.0)
    res = reg.register(moved)
    rre, rte = metrics.rre_deg(res.transform, truth), metrics.rte_mm(res.transform, truth, moved)
    assert metrics.is_success(rre, rte), (rre, rte)
    assert res.accepted, res.rejection_reasons


def test_wrong_side_femur_is_not_accepted(femurs):
    # The left femur's cloud against the right femur: a mirror image, no rigid fit exists.
    reg, _ = femurs['right']
    _, cloud = femurs['left']
    moved, _ = bench_trial(cloud, seed=0, trial=1, noise_mm=0.0)
    res = reg.register(moved)
    assert not res.accepted, res.summary()
