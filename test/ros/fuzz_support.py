"""Hostile PointCloud2 messages by class, for the fuzz test of the registration node.

Every case is invalid by construction, so the node must refuse it: headers (frame ids,
stamps), sizes, field tables, values, and degenerate geometry; plus seeded random single
mutations of a good cloud drawn from mutation families that each make a cloud unreadable.
Each case carries a unique header stamp (its marker), which the node's diagnostic repeats,
so every diagnostic can be matched to the input it explains.
"""

from __future__ import annotations

import array
from dataclasses import dataclass
from typing import Callable, Iterator

from builtin_interfaces.msg import Time
import numpy as np
from sensor_msgs.msg import PointCloud2, PointField

from neural_bone_reg.core import sim
from neural_bone_reg.core.se3 import apply_transform
from neural_bone_reg.ros.conversions import image_to_cloud, xyz_to_cloud

#: The node's bone frame in the fuzz test (the model's default).
BONE_FRAME = 'bone'
#: Seconds of the first marker stamp; case i is stamped BASE_SEC + i.
BASE_SEC = 1_000
#: Points of the degenerate clouds (the campaign's sizes).
DEGENERATE_POINTS = 2_100
#: Image size of the organised RGB-D cloud (a 640 x 480 camera, 16 bytes a point: 4.9 MB).
IMAGE_SHAPE = (480, 640)
#: Stages at which the node must refuse a case: 'input' (on arrival, ERROR on the input
#: diagnostic) or 'solver' (valid to read, refused by the core: no tf, a registration
#: diagnostic).
STAGES = ('input', 'solver')


@dataclass
class Case:
    """One hostile message, the stage that must refuse it and its class."""

    name: str
    msg: PointCloud2
    stage: str = 'input'
    group: str = ''

    @property
    def marker(self) -> str:
        """Return the stamp as the node's diagnostics write it."""
        stamp = self.msg.header.stamp
        return f'{stamp.sec}.{stamp.nanosec:09d}'


def good_points_m(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (T_robot_bone in mm, a posed phantom sweep in metres) that registers."""
    rng = np.random.default_rng(seed)
    pose = sim.random_pose(rng)
    points = apply_transform(pose, np.vstack(sim.simulate_sweep(sim.make_phantom_mesh(), rng)))
    return pose, points / 1000.0


def organised_rgbd_cloud(points_m: np.ndarray, frame: str, stamp_ns: int,
                         seed: int = 0) -> PointCloud2:
    """Return a 640 x 480 xyz + rgb organised cloud holding ``points_m``, NaN elsewhere."""
    rng = np.random.default_rng(seed)
    height, width = IMAGE_SHAPE
    image = np.full((height * width, 3), np.nan)
    pixels = rng.choice(height * width, size=min(len(points_m), height * width), replace=False)
    image[np.sort(pixels)] = points_m[:len(pixels)]
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return image_to_cloud(image.reshape(height, width, 3), frame, stamp_ns, rgb=rgb, unit='m')


def _cloud(points_m: np.ndarray, frame: str = 'fuzz') -> PointCloud2:
    return xyz_to_cloud(np.asarray(points_m, dtype=np.float64), frame, 0, unit='m')


def _with_fields(msg: PointCloud2, *specs: tuple[str, int, int, int]) -> PointCloud2:
    msg.fields = [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in specs]
    return msg


def _float64_cloud(points_m: np.ndarray, frame: str = 'fuzz') -> PointCloud2:
    """Return a packed little-endian FLOAT64 x y z cloud (values written as given)."""
    msg = _cloud(np.zeros((len(points_m), 3)), frame)
    _with_fields(msg, *[(n, 8 * i, PointField.FLOAT64, 1) for i, n in enumerate('xyz')])
    msg.point_step, msg.row_step, msg.is_bigendian = 24, 24 * len(points_m), False
    msg.data = array.array('B', np.ascontiguousarray(points_m, '<f8').tobytes())
    return msg


def _header_cases(good: np.ndarray) -> Iterator[tuple[str, PointCloud2]]:
    for name, frame in [('frame_empty', ''), ('frame_bone', BONE_FRAME),
                        ('frame_slash_bone', '/' + BONE_FRAME), ('frame_slashes', '///'),
                        ('frame_huge', 'f' * 100_000), ('frame_long', 'g' * 257),
                        ('frame_non_ascii', 'kamera_\u00fc'), ('frame_cjk', '\u76f8\u673a'),
                        ('frame_newline', 'cam\nera'), ('frame_space', 'camera link'),
                        ('frame_nul', 'cam\x01era'), ('frame_emoji', '\U0001f9b4')]:
        yield name, _cloud(good, frame)
    for name, sec, nanosec in [('stamp_negative', -1, 0), ('stamp_most_negative', -2**31, 1),
                               ('stamp_nanosec_1e9', 7, 1_000_000_000),
                               ('stamp_nanosec_max', 8, 2**32 - 1),
                               ('stamp_wrap', 2**31 - 1, 2**32 - 1),
                               ('stamp_negative_nanosec_max', -5, 2**32 - 2)]:
        msg = _cloud(good, 'fuzz_stamp')
        msg.header.stamp = Time(sec=sec, nanosec=nanosec)
        yield name, msg


def _size_cases(good: np.ndarray) -> Iterator[tuple[str, PointCloud2]]:
    def edit(name: str, change: Callable[[PointCloud2], None]) -> tuple[str, PointCloud2]:
        msg = _cloud(good, 'fuzz_size')
        change(msg)
        return name, msg

    def setter(**values: int) -> Callable[[PointCloud2], None]:
        return lambda msg: [setattr(msg, k, v) for k, v in values.items()] and None

    n = len(good)
    yield edit('width_plus_one', setter(width=n + 1))
    yield edit('width_max', setter(width=2**32 - 1))
    yield edit('height_two', setter(height=2))
    yield edit('height_max', setter(height=2**32 - 1))
    yield edit('height_zero_with_data', setter(height=0))
    yield edit('width_zero_with_data', setter(width=0))
    yield edit('width_height_overflow', setter(width=2**16, height=2**16))
    yield edit('point_step_zero', setter(point_step=0))
    yield edit('point_step_small', setter(point_step=8))
    yield edit('point_step_2_31', setter(point_step=2**31))
    yield edit('point_step_max', setter(point_step=2**32 - 1))
    yield edit('point_step_max_consistent', setter(width=1, point_step=2**32 - 1,
                                                   row_step=2**32 - 1))
    yield edit('row_step_small', setter(row_step=12 * n - 1))
    yield edit('row_step_large', setter(row_step=12 * n + 4))
    yield edit('row_step_max', setter(row_step=2**32 - 1))
    yield edit('row_step_zero', setter(row_step=0))
    yield edit('data_short', lambda m: setattr(m, 'data', m.data[:-1]))
    yield edit('data_long', lambda m: setattr(m, 'data', m.data + array.array('B', b'\0')))
    yield edit('data_empty', lambda m: setattr(m, 'data', array.array('B')))
    tiny = _cloud(good[:1], 'fuzz_size')
    tiny.width, tiny.point_step = 1, 2**32 - 1  # the campaign's crasher: 12 bytes of data
    yield 'point_step_crasher', tiny


def _field_cases(good: np.ndarray) -> Iterator[tuple[str, PointCloud2]]:
    def fields(name: str, *specs: tuple[str, int, int, int]) -> tuple[str, PointCloud2]:
        return name, _with_fields(_cloud(good, 'fuzz_fields'), *specs)

    f32 = PointField.FLOAT32
    yield fields('no_fields')
    yield fields('missing_z', ('x', 0, f32, 1), ('y', 4, f32, 1))
    yield fields('upper_case', ('X', 0, f32, 1), ('Y', 4, f32, 1), ('Z', 8, f32, 1))
    yield fields('duplicate_x', ('x', 0, f32, 1), ('x', 4, f32, 1), ('y', 4, f32, 1),
                 ('z', 8, f32, 1))
    yield fields('duplicate_all', *[(n, o, f32, 1) for n in 'xyz' for o in (0, 4, 8)])
    yield fields('overlap', ('x', 0, f32, 1), ('y', 2, f32, 1), ('z', 8, f32, 1))
    for datatype in (0, PointField.INT8, PointField.UINT16, PointField.INT32,
                     PointField.UINT32, 9, 200, 255):
        yield fields(f'x_datatype_{datatype}', ('x', 0, datatype, 1), ('y', 4, f32, 1),
                     ('z', 8, f32, 1))
    yield fields('extra_invalid_datatype', ('x', 0, f32, 1), ('y', 4, f32, 1),
                 ('z', 8, f32, 1), ('rgb', 0, 42, 1))
    for count in (0, 2, 3, 2**32 - 1):
        yield fields(f'x_count_{count}', ('x', 0, f32, count), ('y', 4, f32, 1),
                     ('z', 8, f32, 1))
    yield fields('extra_count_overrun', ('x', 0, f32, 1), ('y', 4, f32, 1), ('z', 8, f32, 1),
                 ('normal', 4, f32, 3))
    for offset in (9, 12, 2**31, 2**32 - 1):
        yield fields(f'z_offset_{offset}', ('x', 0, f32, 1), ('y', 4, f32, 1),
                     ('z', offset, f32, 1))
    yield fields('x_float64_in_f32_point', ('x', 0, PointField.FLOAT64, 1), ('y', 8, f32, 1),
                 ('z', 4, f32, 1))
    yield fields('ten_thousand_fields', *[(f'f{i}', 0, PointField.UINT8, 1)
                                          for i in range(10_000)])
    yield fields('ten_thousand_with_xyz', ('x', 0, f32, 1), ('y', 4, f32, 1), ('z', 8, f32, 1),
                 *[(f'pad{i}', 0, PointField.UINT8, 1) for i in range(10_000)])
    yield fields('names_huge', *[(n * 10_000, o, f32, 1) for n, o in zip('xyz', (0, 4, 8))])
    yield fields('names_non_ascii', ('\u00e9', 0, f32, 1), ('y', 4, f32, 1), ('z', 8, f32, 1))


def _value_cases(good: np.ndarray) -> Iterator[tuple[str, PointCloud2, str]]:
    n = len(good)
    yield 'all_nan', _cloud(np.full((n, 3), np.nan)), 'input'
    yield 'all_inf', _cloud(np.full((n, 3), np.inf)), 'input'
    mixed = np.where(np.arange(n)[:, None] % 2 == 0, np.nan, -np.inf) * np.ones((n, 3))
    yield 'nan_and_minus_inf', _cloud(mixed), 'input'
    yield 'float64_1e300', _float64_cloud(np.full((n, 3), 1e300)), 'input'
    yield 'float64_1e300_mixed', _float64_cloud(np.vstack([good, [[1e300, 0, 0]]])), 'input'
    yield 'denormals', _cloud(np.full((n, 3), 1e-40) * np.arange(n)[:, None]), 'input'
    swapped = _cloud(good)
    swapped.is_bigendian = not swapped.is_bigendian
    yield 'wrong_endianness_f4', swapped, 'input'
    swapped64 = _float64_cloud(good)
    swapped64.is_bigendian = True
    yield 'wrong_endianness_f8', swapped64, 'input'
    yield 'identical_points', _cloud(np.tile([[0.1, 0.1, 0.1]], (DEGENERATE_POINTS, 1))), 'input'
    yield 'millimetres_on_metre_wire', _cloud(good * 1000.0), 'input'
    yield 'metres_divided_twice', _cloud(good / 1000.0), 'input'
    yield 'gigantic', _cloud(good + 1e7), 'input'
    yield 'one_far_point', _cloud(np.vstack([good, [[5e4, 0, 0]]])), 'input'
    yield 'float32_max', _cloud(np.full((n, 3), 3.4e38)), 'input'


def degenerate_cases() -> Iterator[tuple[str, PointCloud2]]:
    """Yield clouds that read fine but cannot pin six degrees of freedom (issue 10)."""
    rng = np.random.default_rng(3)
    three = np.array([[0.10, 0.10, 0.10], [0.15, 0.10, 0.10], [0.10, 0.16, 0.12]])
    yield 'three_distinct_points', _cloud(three[rng.integers(0, 3, DEGENERATE_POINTS)])
    line = np.linspace(0.0, 0.06, 2_000)[:, None] * np.array([[0.6, 0.8, 0.0]]) + 0.1
    yield 'collinear', _cloud(line)
    plane = np.c_[rng.uniform(0, 0.05, (2_000, 2)), np.zeros(2_000)] + 0.1
    yield 'planar_thin', _cloud(plane)


def _random_mutants(good: np.ndarray, rng: np.random.Generator,
                    count: int) -> Iterator[tuple[str, PointCloud2]]:
    """Yield seeded single mutations, each from a family that always makes a cloud unusable."""
    n = len(good)
    big = [1, 3, 11, 2**16, 2**31 - 1, 2**31, 2**32 - 1]

    def width(m: PointCloud2) -> str:
        m.width = int(min(n + rng.choice(big), 2**32 - 1))
        return f'width={m.width}'

    def height(m: PointCloud2) -> str:
        m.height = int(rng.choice([0, 2, 3, 2**31, 2**32 - 1]))
        return f'height={m.height}'

    def point_step(m: PointCloud2) -> str:
        m.point_step = int(rng.choice([0, 1, 4, 11, 13, 2**16, 2**31, 2**32 - 1]))
        return f'point_step={m.point_step}'

    def row_step(m: PointCloud2) -> str:
        m.row_step = int(rng.choice([0, 12 * n - 1, 12 * n + 1, 12 * n + 12, 2**32 - 1]))
        return f'row_step={m.row_step}'

    def data(m: PointCloud2) -> str:
        k = int(rng.integers(1, 64))
        m.data = m.data[:-k] if rng.random() < 0.5 else m.data + array.array('B', bytes(k))
        return f'data_len={len(m.data)}'

    def field(m: PointCloud2) -> str:
        f = m.fields[int(rng.integers(0, 3))]
        what = rng.choice(['datatype', 'count', 'offset', 'name'])
        if what == 'datatype':
            f.datatype = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 9, 17, 255]))
        elif what == 'count':
            f.count = int(rng.choice([0, 2, 3, 7, 2**32 - 1]))
        elif what == 'offset':
            f.offset = int(rng.choice([1, 2, 3, 5, 9, 12, 100, 2**32 - 1]))
        else:
            f.name = str(rng.choice(['', 'X', 'xx', 'x ', 'w', 'rgb', '\u00fc']))
        return f'{f.name}.{what}'

    def drop_field(m: PointCloud2) -> str:
        del m.fields[int(rng.integers(0, 3))]
        return 'dropped a coordinate'

    def stamp(m: PointCloud2) -> str:
        if rng.random() < 0.5:
            m.header.stamp.sec = int(rng.integers(-2**31, 0))
        else:
            m.header.stamp.nanosec = int(rng.integers(1_000_000_000, 2**32))
        return f'stamp={m.header.stamp.sec}.{m.header.stamp.nanosec}'

    def frame(m: PointCloud2) -> str:
        length = int(rng.choice([257, 1000, 65_536]))
        alphabet = [chr(c) for c in (1, 9, 10, 32, 0xe9, 0x4e2d, 0x1f600)]
        m.header.frame_id = ''.join(rng.choice(alphabet, size=8)) + 'x' * (length % 7)
        if rng.random() < 0.5:
            m.header.frame_id = 'y' * length
        return f'frame of {len(m.header.frame_id)} characters'

    families = [width, height, point_step, row_step, data, field, drop_field, stamp, frame]
    for i in range(count):
        family = families[int(rng.integers(0, len(families)))]
        msg = _cloud(good, f'fuzz_random_{i}')
        detail = family(msg)
        yield f'random_{i}_{family.__name__}({detail})', msg


def hostile_cases(seed: int, n_random: int) -> list[Case]:
    """Return every class's cases plus ``n_random`` seeded mutants, each with a unique marker.

    Cases whose stamp is not under test are stamped BASE_SEC + index; the stamp cases keep
    their invalid stamps, which are distinct from each other and from the markers.
    """
    rng = np.random.default_rng(seed)
    _, good = good_points_m(seed)
    cases = [Case(name, msg, group='header') for name, msg in _header_cases(good)]
    cases += [Case(name, msg, group='size') for name, msg in _size_cases(good)]
    cases += [Case(name, msg, group='fields') for name, msg in _field_cases(good)]
    cases += [Case(name, msg, stage, group='values') for name, msg, stage in _value_cases(good)]
    mutants = _random_mutants(good, rng, n_random)
    cases += [Case(name, msg, group='random') for name, msg in mutants]
    stamped: set[str] = set()
    for i, case in enumerate(cases):
        stamp = case.msg.header.stamp
        if (stamp.sec, stamp.nanosec) == (0, 0):
            case.msg.header.stamp = Time(sec=BASE_SEC + i, nanosec=0)
        elif case.marker in stamped:  # a random stamp mutant that repeats one: make it new
            case.msg.header.stamp.sec = -BASE_SEC - i
        stamped.add(case.marker)
    assert len(stamped) == len(cases), 'case markers must be unique'
    return cases


def degenerate(first_sec: int) -> list[Case]:
    """Return the degenerate clouds, stamped from ``first_sec`` on."""
    cases = []
    for i, (name, msg) in enumerate(degenerate_cases()):
        msg.header.frame_id = f'fuzz_{name}'
        msg.header.stamp = Time(sec=first_sec + i, nanosec=0)
        cases.append(Case(name, msg, 'solver', group='degenerate'))
    return cases


def flood(cases: list[Case], total: int) -> list[PointCloud2]:
    """Return ``total`` input-stage cases in turn (headers aside: they are long to send).

    Stamps are kept as they are: restamping would heal the stamp cases.
    """
    pool = [c.msg for c in cases if c.stage == 'input' and c.group != 'header']
    return [pool[i % len(pool)] for i in range(total)]
