"""check_points phrases its errors in the caller's unit without changing what it accepts."""

import numpy as np
import pytest

from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.io import check_points

RNG = np.random.default_rng(0)
TINY = RNG.uniform(0, 0.1, size=(500, 3))  # mm: 0.17 mm across
HUGE = RNG.uniform(0, 1e7, size=(500, 3))  # mm: 10 km from the origin
GOOD = RNG.uniform(-30, 30, size=(500, 3))


@pytest.mark.parametrize('points, mm_message, m_message', [
    (TINY, r'spans only 0\.1\d* units; .* Is it in metres\?',
     r'spans only 0\.000\d* m; expected a bone patch at least 0\.005 m across\. Were '
     'millimetres divided by 1000 twice'),
    (HUGE, r'coordinates up to 1e\+07; expected mm within 1e\+06',
     r'coordinates up to 1e\+04 m; expected metres \(REP 103\) within 1000 m'),
])
def test_messages_speak_the_report_unit(points, mm_message, m_message):
    with pytest.raises(InputError, match=mm_message):
        check_points(points)
    with pytest.raises(InputError, match=m_message) as info:
        check_points(points, report_unit='m')
    assert 'Is it in metres' not in str(info.value) and 'expected mm' not in str(info.value)


def test_the_report_unit_does_not_change_what_is_accepted():
    np.testing.assert_array_equal(check_points(GOOD), check_points(GOOD, report_unit='m'))


def test_unknown_report_unit():
    with pytest.raises(ValueError, match=r"report_unit must be one of \['m', 'mm'\]"):
        check_points(GOOD, report_unit='cm')
