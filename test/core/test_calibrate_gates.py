"""benchmarks/calibrate_gates.py: the choice of a covariance setting and uniqueness gate."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pytest

from neural_bone_reg.core.config import RegistrationConfig

BENCHMARKS = Path(__file__).resolve().parents[2] / 'benchmarks'


@pytest.fixture
def calibrate(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module('calibrate_gates')


def _row(calibrate, protocol, *, right_bone=True, correct=True, z=10.0, delta_mm=0.0,
         sandwich=(0.01, 1e-7), unit=(1.0, 1e-5), bone='a', cloud=None):
    row = {'bone': bone, 'cloud': cloud or bone, 'protocol': protocol, 'right_bone': right_bone,
           'correct': correct, 'uniqueness_z': z, 'residual_mm': 1.0, 'inlier_fraction': 0.9,
           'noise_level_mm': 1.0, 'target': [0.0, 0.0, 0.0],
           'sandwich': np.diag([sandwich[0]] * 3 + [sandwich[1]] * 3).tolist(),
           'delta_case_floor': [delta_mm, 0.0, 0.0, 0.0, 0.0, 0.0]}
    for length in calibrate.LENGTHS_MM:
        row[f'unit_systematic_{length:g}'] = np.diag([unit[0]] * 3 + [unit[1]] * 3).tolist()
    return row


def test_the_chosen_setting_covers_the_patch_error_and_keeps_the_wrong_fit_out(calibrate):
    rows = [
        _row(calibrate, 'full', unit=(0.1, 1e-6)),
        # A correct patch 1.6 mm off the floor: its sandwich and the configured rigid error
        # (0.1 and 0.3 mm per axis) cannot cover it, a systematic offset of 0.32-0.64 mm can,
        # and more is too imprecise to accept.
        _row(calibrate, 'patch40', delta_mm=1.6),
        # A wrong fit on another bone, as precise as any, at 5.5 standard errors.
        _row(calibrate, 'full', right_bone=False, correct=False, z=5.5, cloud='b'),
    ]
    cfg = RegistrationConfig()
    setting, result = calibrate.choose(rows, cfg)
    assert setting.min_z == 6.0
    assert (setting.rigid_mm, setting.rigid_deg) == (cfg.rigid_error_mm, cfg.rigid_error_deg)
    assert 0.1 <= setting.systematic_mm ** 2 + setting.noise_bias ** 2 <= 0.42
    assert result['patch']['accepted_correct'] == 1 and result['patch']['coverage'] == 1.0
    assert result['wrong_accepted'] == 0 and result['full']['accepted_correct'] == 1
    # No systematic term: the patch is accepted but its ellipsoid misses the error.
    bare = calibrate.Setting(1.0, 0.0, 50.0, 0.0, 6.0, **calibrate.RIGID)
    scored = calibrate.score(calibrate.judge(rows, bare, cfg))
    assert scored['patch']['coverage'] == 0.0 and not calibrate.feasible(scored)


def test_no_setting_is_feasible_when_a_wrong_fit_is_unique_and_precise(calibrate):
    rows = [_row(calibrate, 'full'),
            _row(calibrate, 'full', right_bone=False, correct=False, z=50.0, cloud='b')]
    assert calibrate.choose(rows, RegistrationConfig()) is None


def test_the_noise_scaled_residual_gate_admits_noisy_fits_but_never_a_wrong_one(calibrate):
    noisy = _row(calibrate, 'noise4')
    noisy.update(residual_mm=2.6, noise_level_mm=4.0)  # 0.65 x its noise: only >= 0.7 admits
    rows = [_row(calibrate, 'full'), noisy]
    cfg = RegistrationConfig()
    setting, result = calibrate.choose(rows, cfg)
    assert setting.residual_factor >= 0.7 and result['noise']['accepted_correct'] == 1
    fixed = dataclasses.replace(setting, residual_factor=0.0)
    assert calibrate.score(calibrate.judge(rows, fixed, cfg))['noise']['accepted_correct'] == 0
    # A wrong fit as unique and precise, whose residual is 0.6 x its noise, bars every factor
    # that would admit the noisy fit.
    wrong = _row(calibrate, 'noise4', right_bone=False, correct=False, cloud='b')
    wrong.update(residual_mm=2.4, noise_level_mm=4.0)
    setting, result = calibrate.choose(rows + [wrong], cfg)
    assert setting.residual_factor < 0.6 and result['wrong_accepted'] == 0
    assert result['noise']['accepted_correct'] == 0


def test_a_refusal_by_a_gate_calibration_does_not_vary_stands_under_every_setting(calibrate):
    cfg = RegistrationConfig()
    setting = calibrate.Setting(2.0, 0.0, 50.0, 0.1, 6.0, 0.7)
    fine = _row(calibrate, 'full')
    (judged,) = calibrate.judge([fine], setting, cfg)
    assert judged['accepted']
    for reason in ('not converged: ICP still moved the cloud 0.30 mm on its last step',
                   'too noisy: measured point noise 6.10 mm > 5.0 mm'):
        refused = {**fine, 'reasons': [reason]}
        (judged,) = calibrate.judge([refused], setting, cfg)
        assert not judged['accepted'], reason
    # A reason the setting replays (uniqueness) does not decide by itself.
    replayed = {**fine, 'reasons': ['ambiguous: a distinct pose fits only 0.1 mm worse']}
    assert calibrate.judge([replayed], setting, cfg)[0]['accepted']


def test_cluster_offsets_measure_what_a_cluster_shares_beyond_its_noise(calibrate):
    # Two clusters of 400 points offset by +1 and -1 mm about a 0.5 mm mean, 0.3 mm of noise,
    # and far outliers that are no inliers: the centred RMS is 1 mm, the raw one sqrt(1.25).
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [400, 400, 3])
    residual = np.concatenate([np.full(400, 1.5), np.full(400, -0.5), np.full(3, 50.0)])
    residual[:800] += rng.normal(0.0, 0.3, 800)
    out = calibrate._cluster_offsets(residual, labels, 0.3, 5.0)
    assert out['cluster_offset_centred_mm'] == pytest.approx(1.0, abs=0.02)
    assert out['cluster_offset_rms_mm'] == pytest.approx(np.sqrt(1.25), abs=0.02)
    assert out['mean_offset_mm'] == pytest.approx(0.5, abs=0.02)


def test_the_replayed_covariance_carries_the_registrar_s_rigid_error(calibrate):
    from neural_bone_reg.core.confidence import rigid_error_covariance

    # The replay must score the covariance the registrar gives: the rigid error about the
    # fit's centre (its ICP points' mean), or the cloud's centroid in rows that lack it.
    row = _row(calibrate, 'patch60')
    row['target'] = [10.0, -300.0, 1500.0]
    plain = calibrate.Setting(2.0, 0.0, 50.0, 0.1, 6.0)
    rigid = dataclasses.replace(plain, rigid_mm=0.3, rigid_deg=0.1)
    expected = rigid_error_covariance(np.asarray(row['target']), 0.3, 0.1)
    np.testing.assert_allclose(rigid.covariance(row) - plain.covariance(row), expected,
                               atol=1e-12)
    row['centre'] = [12.0, -298.0, 1490.0]
    expected = rigid_error_covariance(np.asarray(row['centre']), 0.3, 0.1)
    np.testing.assert_allclose(rigid.covariance(row) - plain.covariance(row), expected,
                               atol=1e-12)


def test_the_cache_file_is_strict_json_and_reads_back_nan_and_inf_exactly(calibrate, tmp_path):
    import json

    row = _row(calibrate, 'patch25', z=float('inf'))
    row.update(noise_level_mm=float('nan'), mahalanobis2_case_floor=None,
               reasons=['no alternative: every candidate converged to one pose'])
    row['sandwich'][0][0] = float('-inf')
    path = tmp_path / 'calibration.json'
    calibrate.write_rows(path, [row], seed=1, trials=3)
    text = path.read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f'{name} in strict JSON'))
    (back,) = calibrate.read_rows(path)
    assert back['uniqueness_z'] == float('inf') and np.isnan(back['noise_level_mm'])
    assert back['sandwich'][0][0] == float('-inf') and back['mahalanobis2_case_floor'] is None
    assert back['reasons'] == row['reasons'] and back['protocol'] == 'patch25'
    assert back['sandwich'][1:] == row['sandwich'][1:]
