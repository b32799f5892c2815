"""Read bone meshes and point clouds, and reject unusable geometry with a clear message."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable
import uuid

import numpy as np
import trimesh

from neural_bone_reg.core.errors import InputError

MESH_SUFFIXES = ('.stl', '.ply', '.obj')
CLOUD_SUFFIXES = ('.xyz', '.txt', '.ply', '.pcd', '.npy')
#: A bone cloud whose bounding-box diagonal is below this is taken to be in metres, not mm.
MIN_CLOUD_EXTENT_MM = 5.0
#: A bone mesh smaller than this (bounding-box diagonal) is not in mm or is degenerate.
MIN_MESH_EXTENT_MM = 10.0
#: Coordinates beyond this magnitude are not a bone in mm in any sane robot frame.
MAX_ABS_COORDINATE_MM = 1e6
#: Units that check_points may phrase its messages in: report unit -> (per mm, unit name).
REPORT_UNITS = {'mm': (1.0, 'mm'), 'm': (1e-3, 'm')}


def json_safe(value: Any, non_finite: Callable[[float], Any] = lambda v: None) -> Any:
    """Return ``value`` with every non-finite float as None and numpy values as Python ones.

    Strict JSON has no NaN or Infinity (``json.dumps`` writes them by default, and parsers
    such as JavaScript's reject them): an unmeasured figure (nan) or an unbounded one (inf)
    becomes null, or what ``non_finite`` makes of it. Anything else that is not JSON becomes
    its ``str``.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v, non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, non_finite) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), non_finite)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else non_finite(float(value))
    if value is None or isinstance(value, str):
        return value
    return str(value)


def dumps_json(value: Any, **kwargs: Any) -> str:
    """Return ``value`` as strict JSON (see :func:`json_safe`); ``kwargs`` go to json.dumps."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Have ``write`` fill a temporary file beside ``path``, then rename it onto ``path``.

    Readers never see a partial file, and writers racing on one ``path`` (threads or
    processes filling one cache) each write a file of their own: the name is unique.
    """
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_sha256(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def load_mesh(path: str | Path) -> trimesh.Trimesh:
    """Load a bone surface mesh (STL, PLY or OBJ, in mm) and check it is usable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f'mesh file {path} does not exist; expected an STL, PLY or OBJ bone surface')
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise InputError(
            f'mesh file {path} has suffix {path.suffix!r}; expected one of {MESH_SUFFIXES}')
    try:
        mesh = trimesh.load(path, force='mesh', process=True)
    except Exception as exc:  # trimesh raises many types for corrupt files
        raise InputError(
            f'cannot read mesh {path}: {exc}; expected a valid {path.suffix} surface') from exc
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise InputError(f'mesh {path} has no triangles; expected a closed bone surface')
    check_mesh(mesh, str(path))
    return mesh


def check_mesh(mesh: trimesh.Trimesh, name: str = 'mesh') -> None:
    """Raise InputError when a mesh is empty, non-finite, or too small to be a bone in mm."""
    if len(mesh.faces) < 4:
        raise InputError(f'{name} has {len(mesh.faces)} triangles; expected a closed bone surface')
    if not np.isfinite(mesh.vertices).all():
        raise InputError(f'{name} has non-finite vertices; expected finite coordinates in mm')
    extent = float(np.linalg.norm(mesh.extents))
    if extent < MIN_MESH_EXTENT_MM:
        raise InputError(f'{name} spans only {extent:.3g} units; expected a bone in millimetres '
                         f'(at least {MIN_MESH_EXTENT_MM} mm). Is it in metres?')
    if mesh.area <= 0.0:
        raise InputError(f'{name} has zero surface area; expected a bone surface')


def load_cloud(path: str | Path) -> np.ndarray:
    """Load an (N, 3) point cloud in mm from .xyz/.txt, .ply, .pcd or .npy."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f'cloud file {path} does not exist; expected one of {CLOUD_SUFFIXES}')
    suffix = path.suffix.lower()
    try:
        if suffix in ('.xyz', '.txt'):
            points = np.loadtxt(path, ndmin=2, usecols=(0, 1, 2), comments=('#', '//'))
        elif suffix == '.npy':
            points = np.load(path, allow_pickle=False)
        elif suffix == '.pcd':
            points = _read_pcd(path)
        elif suffix == '.ply':
            geometry = trimesh.load(path, process=False)
            points = np.asarray(getattr(geometry, 'vertices', np.empty((0, 3))))
        else:
            raise InputError(f'cloud file {path} has suffix {path.suffix!r}; expected one of '
                             f'{CLOUD_SUFFIXES}')
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f'cannot read cloud {path}: {exc}; expected x y z rows in mm') from exc
    return check_points(points, name=f'cloud {path}')


_PCD_TYPES = {('F', 4): '<f4', ('F', 8): '<f8', ('I', 1): '<i1', ('I', 2): '<i2', ('I', 4): '<i4',
              ('I', 8): '<i8', ('U', 1): '<u1', ('U', 2): '<u2', ('U', 4): '<u4', ('U', 8): '<u8'}


def _read_pcd(path: Path) -> np.ndarray:
    """Read x, y, z of a PCD v0.7 file (DATA ascii or binary; not binary_compressed)."""
    raw = path.read_bytes()
    header: dict[str, list[str]] = {}
    offset = 0
    while True:
        end = raw.index(b'\n', offset)
        line = raw[offset:end].decode('ascii', 'replace').strip()
        offset = end + 1
        if not line or line.startswith('#'):
            continue
        key, *values = line.split()
        header[key.upper()] = values
        if key.upper() == 'DATA':
            break
    names, sizes, types = header['FIELDS'], header['SIZE'], header['TYPE']
    counts = header.get('COUNT', ['1'] * len(names))
    if not {'x', 'y', 'z'} <= set(names):
        raise InputError(f'PCD {path} has fields {names}; expected x, y and z')
    try:
        dtype = np.dtype([(n, _PCD_TYPES[(t, int(s))], (int(c),)) if int(c) > 1
                          else (n, _PCD_TYPES[(t, int(s))])
                          for n, s, t, c in zip(names, sizes, types, counts)])
    except KeyError as exc:
        raise InputError(
            f'PCD {path} has an unsupported field type {exc}; expected F/I/U') from exc
    n_points = int(header.get('POINTS', ['0'])[0])
    mode = header['DATA'][0].lower()
    if mode == 'ascii':
        table = np.loadtxt(raw[offset:].decode('ascii').splitlines(), ndmin=2)
        columns = np.cumsum([0] + [int(c) for c in counts])
        return np.stack([table[:, columns[names.index(a)]] for a in 'xyz'], axis=1)
    if mode == 'binary':
        data = np.frombuffer(raw, dtype=dtype, count=n_points, offset=offset)
        return np.stack([data[a].astype(np.float64) for a in 'xyz'], axis=1)
    raise InputError(
        f'PCD {path} uses DATA {mode}; expected ascii or binary (decompress it first)')


def check_points(points: np.ndarray, name: str = 'cloud', min_points: int = 3,
                 drop_nonfinite: bool = True, *, report_unit: str = 'mm') -> np.ndarray:
    """Return a validated float64 (N, 3) copy of ``points``, or raise InputError.

    Non-finite rows are dropped when ``drop_nonfinite`` (sensors mark missing returns with NaN);
    what remains must be at least ``min_points`` points spanning a bone-sized extent in mm.
    ``points`` are always in mm and checked the same way; ``report_unit`` ('mm' or 'm') only
    chooses the unit the messages speak in: 'm' for a caller whose user sent metres (a ROS
    message, REP 103), so that a message never asks a cloud in metres whether it is in metres.
    """
    try:
        scale, unit = REPORT_UNITS[report_unit]
    except KeyError:
        raise ValueError(f'report_unit must be one of {sorted(REPORT_UNITS)}, '
                         f'got {report_unit!r}') from None
    try:
        points = np.asarray(points)
    except (ValueError, TypeError) as exc:  # ragged rows
        raise InputError(f'{name} is not an array of points ({exc}); expected (N, 3) x y z '
                         f'numbers in {unit}') from None
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f'{name} has shape {points.shape}; expected (N, 3) x y z in {unit}')
    if not (np.issubdtype(points.dtype, np.floating) or np.issubdtype(points.dtype, np.integer)):
        raise InputError(f'{name} has dtype {points.dtype}; expected real numbers (floats)')
    points = points.astype(np.float64)
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        if not drop_nonfinite:
            raise InputError(
                f'{name} has {int((~finite).sum())} non-finite points; expected finite {unit}')
        points = points[finite]
    if len(points) == 0:
        raise InputError(f'{name} is empty (or all NaN); expected at least {min_points} points')
    if len(points) < min_points:
        raise InputError(f'{name} has {len(points)} valid points; expected at least {min_points}')
    peak = float(np.abs(points).max())
    if peak > MAX_ABS_COORDINATE_MM:
        if report_unit == 'mm':
            raise InputError(f'{name} has coordinates up to {peak:.3g}; expected mm '
                             f'within {MAX_ABS_COORDINATE_MM:g}')
        raise InputError(f'{name} has coordinates up to {peak * scale:.3g} {unit}; expected '
                         f'metres (REP 103) within {MAX_ABS_COORDINATE_MM * scale:g} {unit} of '
                         "the frame's origin")
    extent = float(np.linalg.norm(points.max(axis=0) - points.min(axis=0)))
    if extent < MIN_CLOUD_EXTENT_MM:
        if report_unit == 'mm':
            raise InputError(f'{name} spans only {extent:.3g} units; expected a bone patch in '
                             f'millimetres (at least {MIN_CLOUD_EXTENT_MM} mm across). '
                             'Is it in metres?')
        raise InputError(f'{name} spans only {extent * scale:.3g} {unit}; expected a bone '
                         f'patch at least {MIN_CLOUD_EXTENT_MM * scale:g} {unit} across. '
                         'Were millimetres divided by 1000 twice, or are the points (nearly) '
                         'all the same?')
    return points
