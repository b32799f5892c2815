"""Config validation, presets and YAML loading."""

import dataclasses

import pytest

from neural_bone_reg.core.config import (configs_from_dict, field_range, interval_text,
                                         load_yaml_configs, loosened_gates,
                                         registration_preset, RegistrationConfig,
                                         section_from_dict, spec, SweepConfig, TrackingConfig,
                                         TrainConfig, UdfConfig)


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
    with pytest.raises(ValueError, match='gate_max_residual_mm must be below inlier_thr'):
        RegistrationConfig(gate_max_residual_mm=5.0)  # it could never fire
    with pytest.raises(ValueError, match='final_candidates'):
        RegistrationConfig(final_candidates=1)  # uniqueness needs an alternative


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


CONFIG_CLASSES = (UdfConfig, TrainConfig, RegistrationConfig, SweepConfig, TrackingConfig)


def _ranged_fields():
    for cls in CONFIG_CLASSES:
        for f in dataclasses.fields(cls):
            if f.metadata.get('range'):
                yield cls, f


@pytest.mark.parametrize('cls', CONFIG_CLASSES)
def test_every_field_is_documented_in_its_metadata(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get('doc'), f'{cls.__name__}.{f.name} has no doc'
        unit = f.metadata.get('unit', '')
        assert unit in ('', 'mm', 'deg', 's'), f'{cls.__name__}.{f.name}: unit {unit!r}'
        for suffix, expected in (('_mm', 'mm'), ('_deg', 'deg'), ('_s', 's')):
            if f.name.endswith(suffix):
                assert unit == expected, f'{cls.__name__}.{f.name} is in {expected}'


@pytest.mark.parametrize('cls,f', list(_ranged_fields()),
                         ids=lambda v: getattr(v, 'name', getattr(v, '__name__', '')))
def test_post_init_enforces_the_declared_range(cls, f):
    """Each end of a declared range is accepted when closed and refused when open."""
    low, high = field_range(f)
    ends = f.metadata['open']
    default = getattr(cls(), f.name)
    step = 1 if isinstance(default, int) else max(abs(default), 1.0) * 1e-6
    # Other fields bound by this one (fine_top_k <= num_hypotheses) are moved along.
    for bound, outside, is_open in ((low, -step, ends in ('low', 'both')),
                                    (high, step, ends in ('high', 'both'))):
        if bound is None:
            continue
        with pytest.raises(ValueError, match=rf'{cls.SECTION}\.{f.name} must be in'):
            cls(**{f.name: type(default)(bound + outside)})
        if is_open:
            with pytest.raises(ValueError, match=rf'{cls.SECTION}\.{f.name} must be in'):
                cls(**{f.name: type(default)(bound)})


def test_interval_text_names_open_ends_and_units():
    by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert interval_text(by_name['learning_rate']) == '(0, 1]'
    assert interval_text(by_name['grid_voxel_mm']) == '[0.25, 10] mm'
    assert interval_text(by_name['uniform_fraction']) == '[0, 1)'
    with pytest.raises(ValueError, match='exclusive'):
        spec(1.0, doc='x', low=0.0, exclusive='left')


def test_sweep_and_tracking_configs():
    assert SweepConfig().min_points == 1500 and TrackingConfig().max_gap_s == 5.0
    with pytest.raises(ValueError, match=r'sweep\.voxel_mm must be in \[0, 50\] mm'):
        SweepConfig(voxel_mm=-1.0)
    with pytest.raises(ValueError, match=r'track\.max_gap_s'):
        TrackingConfig(max_gap_s=0.0)
    sweep = section_from_dict(SweepConfig, {'settle_s': 0, 'max_points': 200})
    assert sweep.settle_s == 0.0 and isinstance(sweep.settle_s, float)
    with pytest.raises(ValueError, match='unknown sweep parameter'):
        section_from_dict(SweepConfig, {'settle': 0.1})


def _strict_fields():
    return [f for f in dataclasses.fields(RegistrationConfig) if f.metadata.get('strict')]


def test_every_gate_says_which_way_is_stricter():
    # A gate added without it would loosen silently: loosened_gates would never name it.
    names = {f.name for f in _strict_fields()}
    gates = {f.name for f in dataclasses.fields(RegistrationConfig)
             if f.name.startswith(('gate_', 'track_max_', 'track_min_'))}
    assert gates <= names, gates - names
    assert {'covariance_scale', 'systematic_noise_gain', 'cluster_mm'} <= names


@pytest.mark.parametrize('preset', ['default', 'paper', 'fast'])
def test_the_presets_keep_the_calibrated_gates(preset):
    assert loosened_gates(registration_preset(preset)) == ()


@pytest.mark.parametrize('f', _strict_fields(), ids=lambda f: f.name)
def test_a_gate_moved_towards_accepting_more_is_named(f):
    default = getattr(RegistrationConfig(), f.name)
    way = f.metadata['strict']
    low, high = field_range(f)
    # A value inside the declared range on each side of the default (the residual gate is
    # also bounded by the inlier threshold).
    above = min(default * 1.2 + 0.01, high if high is not None else float('inf'),
                4.9 if f.name == 'gate_max_residual_mm' else float('inf'))
    below = max(default * 0.8, (low or 0.0) + 1e-6) if default > (low or 0.0) else None
    looser, stricter = ((below, above) if way == 'higher' else (above, below))
    if way == 'calibrated':
        looser, stricter = above, None
    for value, named in ((looser, True), (stricter, False)):
        if value is None or value == default:
            continue
        lines = loosened_gates(dataclasses.replace(RegistrationConfig(), **{f.name: value}))
        assert bool(lines) == named, (f.name, value, lines)
        if named:
            (line,) = lines
            assert line.startswith(f'registration.{f.name}=') and f'{default:g}' in line


@pytest.mark.parametrize('values, needle', [
    ({'registration': 5}, "section 'registration' must be a mapping"),
    ({'udf': [1, 2]}, "section 'udf' must be a mapping"),
    ({'train': {'near_surface_sigma_mm': 5}}, 'train.near_surface_sigma_mm must be a list'),
    ({'train': {'near_surface_sigma_mm': [float('inf')]}}, 'list of finite numbers'),
    ({'train': {'near_surface_sigma_mm': [True]}}, 'list of finite numbers'),
    ({'registration': {'precision_target_mm': ['a', 0, 0]}},
     'registration.precision_target_mm must be a list'),
    ({'registration': {'seed': -1}}, r'registration.seed must be in \[0, 4294967295\]'),
    ({'train': {'seed': 2 ** 70}}, r'train.seed must be in \[0, 4294967295\]'),
    ({'registration': {'learning_rate': 'fast'}}, 'learning_rate must be a number'),
])
def test_bad_shapes_and_values_are_refused_with_the_field_named(values, needle):
    with pytest.raises(ValueError, match=needle):
        configs_from_dict(values)


def test_a_bool_is_not_a_number_and_1e_3_is_one():
    with pytest.raises(ValueError, match='num_hypotheses must be a number, got True'):
        RegistrationConfig(num_hypotheses=True)
    # PyYAML (YAML 1.1) reads 1e-3 as a string; ROS 2's parser, as a double: so does this.
    assert configs_from_dict({'registration': {'learning_rate': '1e-3'}}).registration \
        .learning_rate == 1e-3


def test_a_ros_params_file_with_a_list_of_parameters_is_refused(tmp_path):
    from neural_bone_reg.core.config import load_yaml_configs

    path = tmp_path / 'params.yaml'
    path.write_text('node:\n  ros__parameters: [1, 2]\n')
    with pytest.raises(ValueError, match='ros__parameters must be a mapping'):
        load_yaml_configs(path)
    path.write_text('node:\n  ros__parameters:\n    registration:\n      learning_rate: 1e-3\n')
    assert load_yaml_configs(path).registration.learning_rate == 1e-3
