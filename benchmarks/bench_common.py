"""Command-line arguments the real-data benchmarks share (the bench protocol's cases)."""

from __future__ import annotations

import argparse
from pathlib import Path

#: ../shared/data/ultrabones_hip beside the repository, as in CI.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'ultrabones_hip'


def real_data_parser(doc: str, trials: int | None = None,
                     perturbation: bool = False) -> argparse.ArgumentParser:
    """Return a parser with --data, --seed, --device, --cache-dir, --cases, --json.

    ``doc`` is the script's docstring (its first line is the description); ``trials``, when
    given, adds ``--trials`` with that default; ``perturbation`` adds the bench protocol's
    ``--noise-mm`` and ``--patch-mm`` (see ``neural_bone_reg.core.bench``).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument('--data', type=Path, default=DEFAULT_DATA,
                        help='folder of NAME.stl + NAME.xyz pairs (clouds in the mesh frame)')
    if trials is not None:
        parser.add_argument('--trials', type=int, default=trials)
    if perturbation:
        parser.add_argument('--noise-mm', type=float, default=0.0,
                            help='gaussian noise sigma added to each cloud, mm')
        parser.add_argument('--patch-mm', type=float, default=0.0,
                            help='keep only the points within this radius (mm) of a seeded '
                                 'point of each cloud (0: the whole cloud)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--cache-dir')
    parser.add_argument('--cases', nargs='*', help='only these NAMEs')
    parser.add_argument('--json', type=Path, help='write every row here')
    return parser


def real_cases(args: argparse.Namespace) -> tuple[list[str], dict]:
    """Return the cases of ``args.data`` (``--cases`` only, if given) and their clouds by name."""
    from neural_bone_reg.core.bench import bench_cases
    from neural_bone_reg.core.io import load_cloud

    cases = bench_cases(args.data, args.cases)
    return cases, {case: load_cloud(args.data / f'{case}.xyz') for case in cases}


def case_registrar(args: argparse.Namespace, case: str):
    """Return the BoneRegistrar of ``case``'s mesh (its UDF trained or loaded from the cache)."""
    from neural_bone_reg import BoneRegistrar

    return BoneRegistrar.from_mesh(args.data / f'{case}.stl', device=args.device,
                                   cache_dir=args.cache_dir)
