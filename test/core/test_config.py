"""Config validation, presets and YAML loading."""

import pytest

from neural_bone_reg.core.config import (configs_from_dict, load_yaml_configs, registration_preset,
                                         RegistrationConfig, TrainConfig, UdfConfig)


@pytest.mark.parametrize('cls, field, value', [
    (RegistrationConfig, 'backend', 'octree'),
    (RegistrationConfig, 'num_hypotheses', 0),
    (RegistrationConfig, 'robust_scale_mm', -1.0),
    (RegistrationConfig, 'gate_min_inlier_fraction', 1.5),
    (RegistrationConfig, 'coarse_prune_keep', 1.0),
    (TrainConfig, 'grid_voxel_mm', 0.0),
    (TrainConfig, 'near_surface_sigma_mm', (1.0, -2.0)),
    (UdfConfig, 'hidden_dim', 2),
])
def test_invalid_field_raises_naming_it(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


def test_cross_field_checks():
    with pytest.raises(ValueError, match='fine_top_k'):
        RegistrationConfig(num_hypotheses=8, fine_top_k=16)
    with pytest.raises(ValueError, match='min_points'):
        RegistrationConfig(min_points=100, max_points=50)


def test_paper_preset_matches_publication():
    paper = registration_preset('paper')
    assert ((paper.num_hypotheses, paper.coarse_iterations, paper.learning_rate)
            == (5000, 1000, 1e-3))
    assert (paper.coarse_points, paper.fine_points, paper.fine_top_k) == (512, 3000, 64)
    assert paper.refine is False and paper.coarse_prune_every == 0
    with pytest.raises(ValueError, match='unknown preset'):
        registration_preset('turbo')


def test_configs_from_dict_types_and_unknown_keys():
    configs = configs_from_dict({'registration': {'num_hypotheses': 100, 'fine_top_k': 10,
                                                  'final_candidates': 2, 'learning_rate': 1}})
    assert configs.registration.learning_rate == 1.0
    with pytest.raises(ValueError, match='unknown registration parameter'):
        configs_from_dict({'registration': {'num_hypothesis': 100}})
    with pytest.raises(ValueError, match='must be an integer'):
        configs_from_dict({'registration': {'num_hypotheses': 1.5}})
    with pytest.raises(ValueError, match='must be true or false'):
        configs_from_dict({'registration': {'refine': 'yes'}})
    with pytest.raises(ValueError, match='unknown config section'):
        configs_from_dict({'solver': {}})


def test_yaml_plain_and_ros_params(tmp_path):
    plain = tmp_path / 'plain.yaml'
    plain.write_text('registration:\n  num_hypotheses: 256\n  fine_top_k: 8\n'
                     '  final_candidates: 4\ntrain:\n  iterations: 10\n')
    configs = load_yaml_configs(plain)
    assert configs.registration.num_hypotheses == 256 and configs.train.iterations == 10
    ros = tmp_path / 'ros.yaml'
    ros.write_text('registration_node:\n  ros__parameters:\n    robot_frame: base\n'
                   '    registration:\n      seed: 7\n')
    assert load_yaml_configs(ros).registration.seed == 7
    bad = tmp_path / 'bad.yaml'
    bad.write_text('registration: [1, 2\n')
    with pytest.raises(ValueError, match='cannot read config YAML'):
        load_yaml_configs(bad)
