"""Compare registration presets and distance backends on the same perturbed real clouds.

Each trial registers the same cloud with every (preset, backend) pair back to back, so machine
load affects them alike and the time ratios are meaningful. Uses the bench protocol of
``neural-bone-reg bench`` (``neural_bone_reg.core.bench``, with ``--noise-mm`` and
``--patch-mm``), so each pair also gets its accepted-correct, wrong-accepted and search-miss
counts. The first pair is the reference for the ratios.

    .venv/bin/python benchmarks/bench_presets.py --presets default paper --trials 1
    .venv/bin/python benchmarks/bench_presets.py --presets default --backends grid neural
"""

from __future__ import annotations

import itertools
import json
import sys

from bench_common import real_data_parser
import torch

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.core.bench import bench_cases, bench_trial, evaluate_trial, summarise
from neural_bone_reg.core.config import registration_preset
from neural_bone_reg.core.io import load_cloud


def _fmt(value: float | None, digits: int = 2) -> str:
    return f'{value:.{digits}f}' if value is not None else '-'


def main() -> int:
    """Run every preset and backend on the same trials; print times, errors and ratios."""
    parser = real_data_parser(__doc__, trials=1, perturbation=True)
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
            moved, truth = bench_trial(cloud, args.seed, trial, args.noise_mm, args.patch_mm)
            for preset, backend in pairs:
                config = registration_preset(preset, **({'backend': backend} if backend else {}))
                row = evaluate_trial(base.with_config(config), moved, truth)
                rows.append({'case': case, 'trial': trial, 'preset': preset,
                             'backend': config.backend, **row})
                if 'input_error' in row:
                    print(f"{case} #{trial}: input rejected: {row['input_error']}", flush=True)
                    continue
                verdict = 'ok ' if row['success'] else 'BAD'
                print(f'{case} #{trial} {preset:>8} {config.backend:>6}: RRE '
                      f"{row['rre_deg']:7.2f} deg RTE {row['rte_mm']:7.2f} mm {verdict} "
                      f"{'accepted' if row['accepted'] else 'rejected'} "
                      f"{row['time_s']:8.2f} s{' MISS' if row['search_miss'] else ''}",
                      flush=True)
    print(f"\n{'preset':<10}{'backend':<8}{'recall':>8}{'RRE':>7}{'RTE':>7}"
          f"{'t med s':>9}{'t ratio':>9}{'acc ok':>8}{'wrong acc':>10}{'misses':>8}")
    groups = [[r for r in rows if (r['preset'], r['backend']) == key]
              for key in dict.fromkeys((r['preset'], r['backend']) for r in rows)]
    ref = summarise(groups[0])['time_median_s']
    for sub in groups:
        s = summarise(sub)
        med = s['time_median_s']
        print(f"{sub[0]['preset']:<10}{sub[0]['backend']:<8}{s['recall']:>8.2f}"
              f"{_fmt(s['rre_mean_deg']):>7}{_fmt(s['rte_mean_mm']):>7}{_fmt(med):>9}"
              f"{_fmt(med / ref if med and ref else None, 1):>9}{s['accepted_correct']:>8.2f}"
              f"{s['wrong_accepted']:>10}{s['search_misses']:>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({'rows': rows, 'torch': torch.__version__,
                                         'threads': torch.get_num_threads(),
                                         'device': str(base.device)}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
