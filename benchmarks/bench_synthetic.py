"""Benchmark on synthetic partial views of every mesh in a folder (default ../shared/data/meshes).

For trial k of each mesh, a probe-side patch covering 20-40 % of the surface is sampled with
gaussian noise and outliers, moved by a random rigid transform (rotation uniform on SO(3),
translation up to 100 mm) and registered back. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_synthetic.py --trials 10 --json out/synthetic.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import platform
import sys
import time

import numpy as np
import torch

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.core import metrics, sim
from neural_bone_reg.core.config import configs_from_dict
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
            res = reg.register(moved)
            truth = invert_transform(pose)
            rre = metrics.rre_deg(res.transform, truth)
            rte = metrics.rte_mm(res.transform, truth, moved)
            rows.append({'case': path.stem, 'trial': trial, 'rre_deg': rre, 'rte_mm': rte,
                         'success': metrics.is_success(rre, rte), 'accepted': res.accepted,
                         'residual_mm': res.residual_mm, 'inlier_fraction': res.inlier_fraction,
                         'ambiguity': res.ambiguity, 'time_s': res.time_s,
                         'udf_load_or_train_s': load_s, 'udf_accuracy': reg.model.accuracy})
            r = rows[-1]
            verdict = 'ok ' if r['success'] else 'BAD'
            decision = 'accepted' if r['accepted'] else 'rejected'
            print(f'{path.stem} #{trial}: RRE {rre:7.2f} RTE {rte:7.2f} {verdict} '
                  f'{decision} amb {res.ambiguity:.2f} '
                  f'res {res.residual_mm:.2f} {res.time_s:.2f} s', flush=True)
    print('\n{:<24}{:>8}{:>7}{:>7}{:>7}{:>5}{:>10}{:>8}'.format(
        'case', 'recall', 'RRE', 'RTE', 't med', 'acc', 'acc wrong', 'rej ok'))
    for case in [*sorted({r['case'] for r in rows}), 'overall']:
        sub = [r for r in rows if case in ('overall', r['case'])]
        ok = [r for r in sub if r['success']]
        mean = (lambda key: np.mean([r[key] for r in ok]) if ok else float('nan'))
        print(f"{case:<24}{len(ok) / len(sub):>8.2f}{mean('rre_deg'):>7.2f}{mean('rte_mm'):>7.2f}"
              f"{np.median([r['time_s'] for r in sub]):>7.2f}{sum(r['accepted'] for r in sub):>5}"
              f"{sum(r['accepted'] and not r['success'] for r in sub):>10}"
              f"{sum(r['success'] and not r['accepted'] for r in sub):>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        cuda_device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        args.json.write_text(json.dumps({
            'rows': rows, 'args': {k: str(v) for k, v in vars(args).items()},
            'machine': {'torch': torch.__version__, 'threads': torch.get_num_threads(),
                        'cpu': platform.processor() or platform.machine(),
                        'cuda': cuda_device}},
            indent=2, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
