"""Compare registration presets and distance backends on the same perturbed real clouds.

Each trial registers the same cloud with every (preset, backend) pair back to back, so machine
load affects them alike and the time ratios are meaningful. Uses the bench protocol of
``neural-bone-reg bench``. The first pair is the reference for the ratios.

    .venv/bin/python benchmarks/bench_presets.py --presets default paper --trials 1
    .venv/bin/python benchmarks/bench_presets.py --presets default --backends grid neural
"""

from __future__ import annotations

import itertools
import json
import sys

from bench_common import real_data_parser
import numpy as np
import torch

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.cli.commands import bench_cases, bench_trial
from neural_bone_reg.core import metrics
from neural_bone_reg.core.config import registration_preset
from neural_bone_reg.core.io import load_cloud


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float('nan')


def main() -> int:
    """Run every preset and backend on the same trials; print times, errors and ratios."""
    parser = real_data_parser(__doc__, trials=1)
    parser.add_argument('--presets', nargs='+', default=['default', 'paper'])
    parser.add_argument('--backends', nargs='+', choices=('grid', 'neural'), default=None,
                        help="distance backends to compare (default: each preset's own)")
    args = parser.parse_args()

    cases = bench_cases(args.data, args.cases)
    pairs = list(itertools.product(args.presets, args.backends or [None]))
    rows = []
    for case in cases:
        base = BoneRegistrar.from_mesh(args.data / f'{case}.stl', device=args.device,
                                       cache_dir=args.cache_dir)
        cloud = load_cloud(args.data / f'{case}.xyz')
        for trial in range(args.trials):
            moved, truth = bench_trial(cloud, args.seed, trial, 0.0)
            for preset, backend in pairs:
                config = registration_preset(preset, **({'backend': backend} if backend else {}))
                res = base.with_config(config).register(moved)
                rre = metrics.rre_deg(res.transform, truth)
                rte = metrics.rte_mm(res.transform, truth, moved)
                rows.append({'case': case, 'trial': trial, 'preset': preset,
                             'backend': config.backend, 'rre_deg': rre, 'rte_mm': rte,
                             'success': metrics.is_success(rre, rte),
                             'accepted': res.accepted, 'time_s': res.time_s})
                verdict = 'ok ' if rows[-1]['success'] else 'BAD'
                print(f'{case} #{trial} {preset:>8} {config.backend:>6}: RRE {rre:7.2f} deg '
                      f'RTE {rte:7.2f} mm {verdict} {res.time_s:8.2f} s', flush=True)
    print(f"\n{'preset':<10}{'backend':<8}{'recall':>8}{'RRE':>7}{'RTE':>7}"
          f"{'t med s':>9}{'t ratio':>9}")
    groups = [[r for r in rows if (r['preset'], r['backend']) == key]
              for key in dict.fromkeys((r['preset'], r['backend']) for r in rows)]
    ref = np.median([r['time_s'] for r in groups[0]])
    for sub in groups:
        ok = [r for r in sub if r['success']]
        med = np.median([r['time_s'] for r in sub])
        print(f"{sub[0]['preset']:<10}{sub[0]['backend']:<8}{len(ok) / len(sub):>8.2f}"
              f"{_mean(ok, 'rre_deg'):>7.2f}{_mean(ok, 'rte_mm'):>7.2f}{med:>9.2f}"
              f'{med / ref:>9.1f}')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({'rows': rows, 'torch': torch.__version__,
                                         'threads': torch.get_num_threads(),
                                         'device': str(base.device)}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
