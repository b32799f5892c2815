"""Benchmark on synthetic partial views of every mesh in a folder (default ../shared/data/meshes).

For trial k of each mesh, a probe-side patch covering 20-40 % of the surface is sampled with
gaussian noise and outliers, moved by a random rigid transform (rotation uniform on SO(3),
translation up to 100 mm) and registered back. Each trial is scored by the bench protocol's
``evaluate_trial`` (``neural_bone_reg.core.bench``: its floor, search-miss flag and covariance
coverage). Prints a table with ``wrong_accepted`` (target 0) and writes JSON.

    .venv/bin/python benchmarks/bench_synthetic.py --trials 10 --json out/synthetic.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
import platform
import sys
import time

import numpy as np
import torch

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.core import sim
from neural_bone_reg.core.bench import evaluate_trial, summarise
from neural_bone_reg.core.config import configs_from_dict
from neural_bone_reg.core.io import dumps_json
from neural_bone_reg.core.io import load_mesh
from neural_bone_reg.core.se3 import apply_transform, invert_transform

DEFAULT_DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'meshes'
COVERAGE_RANGE = (0.2, 0.4)


def main() -> int:
    """Run the synthetic benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data', type=Path, default=DEFAULT_DATA)
    parser.add_argument('--trials', type=int, default=10)
    parser.add_argument('--points', type=int, default=2000)
    parser.add_argument('--noise-mm', type=float, default=1.0)
    parser.add_argument('--outliers', type=float, default=0.05)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--preset', default='default')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--cache-dir')
    parser.add_argument('--cases', nargs='*')
    parser.add_argument('--json', type=Path)
    args = parser.parse_args()

    meshes = sorted(p for p in args.data.glob('*.stl') if not args.cases or p.stem in args.cases)
    if not meshes:
        print(f'no .stl meshes in {args.data}', file=sys.stderr)
        return 2
    configs = configs_from_dict({}, args.preset)
    rows = []
    for path in meshes:
        tick = time.perf_counter()
        reg = BoneRegistrar.from_mesh(path, device=args.device, cache_dir=args.cache_dir,
                                      configs=configs)
        load_s = time.perf_counter() - tick
        mesh = load_mesh(path)
        reg.register(sim.simulate_partial_cloud(mesh, np.random.default_rng(10 ** 6),
                                                n_points=500))
        for trial in range(args.trials):
            rng = np.random.default_rng([args.seed, trial])
            cloud = sim.simulate_partial_cloud(mesh, rng, coverage=rng.uniform(*COVERAGE_RANGE),
                                               noise_mm=args.noise_mm,
                                               outlier_fraction=args.outliers,
                                               n_points=args.points)
            pose = sim.random_pose(rng, 100.0)
            moved = apply_transform(pose, cloud)
            row = {'case': path.stem, 'trial': trial,
                   **evaluate_trial(reg, moved, invert_transform(pose)),
                   'udf_load_or_train_s': load_s, 'udf_accuracy': reg.model.accuracy}
            rows.append(row)
            if 'input_error' in row:
                print(f"{path.stem} #{trial}: input rejected: {row['input_error']}", flush=True)
                continue
            verdict = 'ok ' if row['success'] else 'BAD'
            decision = 'accepted' if row['accepted'] else 'rejected'
            print(f"{path.stem} #{trial}: RRE {row['rre_deg']:7.2f} RTE {row['rte_mm']:7.2f} "
                  f"{verdict} {decision} amb {row['ambiguity']:.2f} "
                  f"res {row['residual_mm']:.2f} {row['time_s']:.2f} s"
                  f"{' MISS' if row['search_miss'] else ''}", flush=True)
    print('\n{:<24}{:>8}{:>7}{:>7}{:>7}{:>5}{:>8}{:>16}{:>8}{:>8}{:>7}'.format(
        'case', 'recall', 'RRE', 'RTE', 't med', 'acc', 'acc ok', 'wrong_accepted', 'ok rej',
        'misses', 'cover'))
    fmt = (lambda v: f'{v:.2f}' if v is not None else '-')
    summaries = {}
    for case in [*sorted({r['case'] for r in rows}), 'overall']:
        s = summaries[case] = summarise([r for r in rows if case in ('overall', r['case'])])
        print(f"{case:<24}{s['recall']:>8.2f}{fmt(s['rre_mean_deg']):>7}"
              f"{fmt(s['rte_mean_mm']):>7}{fmt(s['time_median_s']):>7}{s['accepted']:>5}"
              f"{s['accepted_correct']:>8.2f}{s['wrong_accepted']:>16}"
              f"{s['correct_rejected']:>8}{s['search_misses']:>8}"
              f"{fmt(s['coverage_trial_floor']):>7}")
    overall = summaries['overall']
    print(f"wrong_accepted: {overall['wrong_accepted']} of {overall['trials']} synthetic views "
          f"(target 0); correct but refused: {overall['correct_rejected']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        cuda_device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        args.json.write_text(dumps_json({
            'summary': summaries['overall'], 'per_case': summaries, 'rows': rows,
            'args': {k: str(v) for k, v in vars(args).items()},
            'machine': {'torch': torch.__version__, 'threads': torch.get_num_threads(),
                        'cpu': platform.processor() or platform.machine(),
                        'cuda': cuda_device}},
            indent=2, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
