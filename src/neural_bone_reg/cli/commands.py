"""``train-udf``, ``register`` and ``bench``: thin front ends of the core."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
from typing import Any, Sequence

#: The bench protocol: translation length uniform in [0, this] mm.
BENCH_MAX_TRANSLATION_MM = 100.0
#: Seed index of the untimed warm-up registration, outside the trial range.
WARMUP_TRIAL = 2 ** 31 - 1


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', help='YAML with udf/train/registration sections (or a ROS '
                                         'params file of this package)')
    parser.add_argument('--preset', default='default',
                        help='registration preset: default, paper, fast')
    parser.add_argument('--device', default='auto',
                        help="'auto' (CUDA if present), 'cpu' or 'cuda'")
    parser.add_argument('--cache-dir',
                        help='UDF checkpoint cache (default ~/.cache/neural_bone_reg)')
    parser.add_argument('--backend', choices=('grid', 'neural'),
                        help='distance backend of the search (default: from the config)')
    parser.add_argument('--seed', type=int, help='registration seed (default: from the config)')


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the core commands to the CLI."""
    train = subparsers.add_parser('train-udf', help="train (or load from cache) a bone's UDF")
    train.add_argument('mesh', help='bone mesh (STL/PLY/OBJ) or surface cloud, in mm')
    _add_common(train)
    train.set_defaults(func=run_train)

    reg = subparsers.add_parser('register', help='register one cloud to a bone mesh')
    reg.add_argument('--mesh', required=True, help='bone mesh (STL/PLY/OBJ), mm')
    reg.add_argument('--cloud', required=True, help='cloud (.xyz/.txt/.ply/.pcd/.npy), mm')
    reg.add_argument('--out', help='result JSON (default: CLOUD.registration.json)')
    _add_common(reg)
    reg.set_defaults(func=run_register)

    bench = subparsers.add_parser(
        'bench', help='benchmark on NAME.stl + NAME.xyz pairs (cloud already in the mesh frame)',
        description='For trial k of each case, the cloud is rotated about its centroid by a '
                    'rotation uniform on SO(3) and translated by a vector of length uniform in '
                    '[0, 100] mm, both seeded by (seed, k); the registration must undo it.')
    bench.add_argument('--data', required=True, help='folder of NAME.stl + NAME.xyz pairs')
    bench.add_argument('--trials', type=int, default=10, help='trials per case')
    bench.add_argument('--cases', nargs='*', help='only these case names')
    bench.add_argument('--noise-mm', type=float, default=0.0,
                       help='extra gaussian noise sigma added to the cloud, in mm')
    bench.add_argument('--json', help='write results JSON here')
    bench.add_argument('--plot', help='write a PNG plot here')
    _add_common(bench)
    bench.set_defaults(func=run_bench)


def _configs(args: argparse.Namespace):
    from neural_bone_reg.core.config import Configs, configs_from_dict, load_yaml_configs

    configs = (load_yaml_configs(args.config, args.preset) if args.config
               else configs_from_dict({}, args.preset))
    cli_values = (('backend', args.backend), ('seed', args.seed))
    overrides = {k: v for k, v in cli_values if v is not None}
    if overrides:
        from dataclasses import replace
        configs = Configs(configs.udf, configs.train, replace(configs.registration, **overrides))
    return configs


def _registrar(mesh: str, args: argparse.Namespace):
    from neural_bone_reg import BoneRegistrar

    return BoneRegistrar.from_mesh(mesh, device=args.device, cache_dir=args.cache_dir,
                                   configs=_configs(args), progress=sys.stderr.isatty() or None)


def run_train(args: argparse.Namespace) -> int:
    """Train or load the UDF and report its accuracy."""
    reg = _registrar(args.mesh, args)
    acc = reg.model.accuracy
    print(f'checkpoint: {reg.checkpoint_path}')
    print(f'geometry sha256: {reg.geometry_sha256}')
    print(f'training time: {reg.model.train_time_s:.1f} s')
    band_mm = acc.get('band_mm', 10)
    neural_mae_mm = acc.get('neural_mae_mm', float('nan'))
    grid_mae_mm = acc.get('grid_mae_mm', float('nan'))
    print(f'UDF MAE within {band_mm:g} mm of the surface: neural {neural_mae_mm:.3f} mm, '
          f'grid {grid_mae_mm:.3f} mm')
    return 0


def run_register(args: argparse.Namespace) -> int:
    """Register one cloud file; exit 0 if accepted, 1 if rejected."""
    import numpy as np

    from neural_bone_reg.core.io import load_cloud

    reg = _registrar(args.mesh, args)
    res = reg.register(load_cloud(args.cloud))
    np.set_printoptions(precision=4, suppress=True)
    print('transform (cloud -> mesh frame, mm):')
    print(res.transform)
    print(f'accepted: {res.accepted}  residual {res.residual_mm:.2f} mm  inliers '
          f'{res.inlier_fraction:.2f}  ambiguity {res.ambiguity:.2f}  time {res.time_s:.2f} s')
    for reason in res.rejection_reasons:
        print(f'  rejected: {reason}')
    out = Path(args.out) if args.out else Path(args.cloud).with_suffix('.registration.json')
    out.write_text(json.dumps(res.summary(), indent=2))
    print(f'saved {out}')
    return 0 if res.accepted else 1


def bench_cases(data: Path, only: Sequence[str] | None = None) -> list[str]:
    """Return the names of the ``NAME.stl`` + ``NAME.xyz`` pairs in ``data`` (those in ``only``).

    Raises ValueError when there is none, naming the folder.
    """
    cases = sorted(p.stem for p in Path(data).glob('*.stl')
                   if (Path(data) / f'{p.stem}.xyz').is_file() and (not only or p.stem in only))
    if not cases:
        raise ValueError(f'no NAME.stl + NAME.xyz pairs in {data}'
                         + (f' among {sorted(only)}' if only else ''))
    return cases


def bench_trial(points: Any, seed: int, trial: int, noise_mm: float) -> tuple[Any, Any]:
    """Return the perturbed cloud of one trial and the ground truth that undoes it."""
    import numpy as np

    from neural_bone_reg.core.se3 import apply_transform, invert_transform, make_transform
    from neural_bone_reg.core.se3 import random_rotations

    rng = np.random.default_rng([seed, trial])
    rotation = random_rotations(1, rng)[0]
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(0.0, BENCH_MAX_TRANSLATION_MM)
    pts = points + rng.normal(scale=noise_mm, size=points.shape) if noise_mm > 0 else points
    centroid = pts.mean(axis=0)
    perturb = make_transform(rotation, centroid + shift - rotation @ centroid)
    return apply_transform(perturb, pts), invert_transform(perturb)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark protocol and print, save and plot the figures."""
    import platform
    import time

    import numpy as np
    import torch

    from neural_bone_reg.core import metrics
    from neural_bone_reg.core.io import load_cloud
    from neural_bone_reg.core.se3 import apply_transform

    data = Path(args.data)
    cases = bench_cases(data, args.cases)
    rows: list[dict[str, Any]] = []
    train_times = {}
    seed = args.seed if args.seed is not None else 0
    for case in cases:
        tick = time.perf_counter()
        reg = _registrar(str(data / f'{case}.stl'), args)
        train_times[case] = {'load_or_train_s': time.perf_counter() - tick,
                             'train_time_s': reg.model.train_time_s, **reg.model.accuracy}
        cloud = load_cloud(data / f'{case}.xyz')
        reg.register(bench_trial(cloud, seed, WARMUP_TRIAL, 0.0)[0])  # warm-up, not timed
        for trial in range(args.trials):
            moved, truth = bench_trial(cloud, seed, trial, args.noise_mm)
            res = reg.register(moved)
            rre = metrics.rre_deg(res.transform, truth)
            rte = metrics.rte_mm(res.transform, truth, moved)
            sample = moved[:: max(len(moved) // 5000, 1)]
            rows.append({
                'case': case, 'trial': trial, 'rre_deg': rre, 'rte_mm': rte,
                'success': metrics.is_success(rre, rte), 'accepted': res.accepted,
                'chamfer_mm': metrics.chamfer_mm(apply_transform(res.transform, sample),
                                                 apply_transform(truth, sample)),
                'residual_mm': res.residual_mm, 'inlier_fraction': res.inlier_fraction,
                'ambiguity': res.ambiguity, 'time_s': res.time_s,
                'rejection_reasons': list(res.rejection_reasons),
            })
            r = rows[-1]
            verdict = 'ok ' if r['success'] else 'BAD'
            decision = 'accepted' if res.accepted else 'rejected'
            print(f'{case} #{trial}: RRE {rre:6.2f} deg  RTE {rte:6.2f} mm  '
                  f'{verdict} {decision}'
                  f'  res {res.residual_mm:.2f}  inl {res.inlier_fraction:.2f}'
                  f'  amb {res.ambiguity:.2f}  {res.time_s:.2f} s', flush=True)

    def summarise(subset: list[dict[str, Any]]) -> dict[str, Any]:
        ok = [r for r in subset if r['success']]
        return {
            'trials': len(subset),
            'recall': len(ok) / len(subset),
            'rre_mean_deg': float(np.mean([r['rre_deg'] for r in ok])) if ok else None,
            'rte_mean_mm': float(np.mean([r['rte_mm'] for r in ok])) if ok else None,
            'chamfer_mean_mm': float(np.mean([r['chamfer_mm'] for r in ok])) if ok else None,
            'time_median_s': float(np.median([r['time_s'] for r in subset])),
            'accepted': sum(r['accepted'] for r in subset),
            'accepted_wrong': sum(r['accepted'] and not r['success'] for r in subset),
            'rejected_correct': sum(r['success'] and not r['accepted'] for r in subset),
        }

    per_case = {case: summarise([r for r in rows if r['case'] == case]) for case in cases}
    summary = summarise(rows)
    header = (f"{'case':<28}{'trials':>7}{'recall':>8}{'RRE deg':>9}{'RTE mm':>8}{'CD mm':>7}"
              f"{'t med s':>9}{'acc':>5}{'acc wrong':>10}{'rej ok':>8}")
    print('\n' + header)
    print('-' * len(header))
    for name, s in [*per_case.items(), ('overall', summary)]:
        fmt = (lambda v: f'{v:.2f}' if v is not None else '-')
        print(f"{name:<28}{s['trials']:>7}{s['recall']:>8.2f}{fmt(s['rre_mean_deg']):>9}"
              f"{fmt(s['rte_mean_mm']):>8}{fmt(s['chamfer_mean_mm']):>7}{s['time_median_s']:>9.2f}"
              f"{s['accepted']:>5}{s['accepted_wrong']:>10}{s['rejected_correct']:>8}")
    configs = _configs(args)
    record = {
        'summary': summary, 'per_case': per_case, 'udf': train_times, 'trials': rows,
        'protocol': {'seed': seed, 'trials': args.trials, 'noise_mm': args.noise_mm,
                     'max_translation_mm': BENCH_MAX_TRANSLATION_MM, 'preset': args.preset},
        'config': {k: v for k, v in vars(configs.registration).items()},
        'machine': {'device': str(_registrar_device(args)), 'torch': torch.__version__,
                    'threads': torch.get_num_threads(),
                    'cpu': platform.processor() or platform.machine(),
                    'python': platform.python_version()},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
        print(f'saved {args.json}')
    if args.plot:
        plot_bench(rows, args.plot, title=f'{data.name}: recall {summary["recall"]:.2f}, '
                                          f'noise {args.noise_mm} mm, preset {args.preset}')
        print(f'saved {args.plot}')
    return 0


def _registrar_device(args: argparse.Namespace) -> Any:
    from neural_bone_reg.core.registrar import resolve_device
    return resolve_device(args.device)


def plot_bench(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Plot RRE against RTE per trial (log axes, recall box) and the time per trial."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from neural_bone_reg.core.metrics import RECALL_RRE_DEG, RECALL_RTE_MM

    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(11, 4.5))
    cases = sorted({r['case'] for r in rows})
    for i, case in enumerate(cases):
        sub = [r for r in rows if r['case'] == case]
        colour = f'C{i}'
        for accepted, marker in ((True, 'o'), (False, 'x')):
            pick = [r for r in sub if r['accepted'] == accepted]
            decision = 'accepted' if accepted else 'rejected'
            ax_err.scatter([max(r['rre_deg'], 1e-2) for r in pick],
                           [max(r['rte_mm'], 1e-2) for r in pick],
                           c=colour, marker=marker,
                           label=f'{case} ({decision})' if pick else None)
        ax_time.bar([f'{case}\n#{r["trial"]}' for r in sub], [r['time_s'] for r in sub],
                    color=colour)
    ax_err.axvline(RECALL_RRE_DEG, color='k', ls='--', lw=0.8)
    ax_err.axhline(RECALL_RTE_MM, color='k', ls='--', lw=0.8)
    ax_err.set(xscale='log', yscale='log', xlabel='RRE (deg)', ylabel='RTE (mm)',
               title='error per trial (dashed: recall thresholds)')
    ax_err.legend(fontsize=7)
    ax_time.set(ylabel='registration time (s)', title='time per trial')
    ax_time.tick_params(axis='x', labelsize=5, rotation=90)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
