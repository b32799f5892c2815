"""``train-udf``, ``register`` and ``bench``: thin front ends of the core (``core.bench``)."""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
from typing import Any

from neural_bone_reg.cli.bag_cmd import non_negative_float

#: Re-exported from ``core.bench`` for the scripts that import them from here; loaded on first
#: use so that building the CLI parser does not import numpy and torch.
_BENCH_EXPORTS = ('BENCH_MAX_TRANSLATION_MM', 'WARMUP_TRIAL', 'bench_cases', 'bench_trial',
                  'run_trial')


def __getattr__(name: str) -> Any:
    if name in _BENCH_EXPORTS:
        from neural_bone_reg.core import bench
        return getattr(bench, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', help='YAML with udf/train/registration sections (or a ROS '
                                         'params file of this package)')
    parser.add_argument('--preset', default='default',
                        help='registration preset: default, paper, fast')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                        help="'auto' (CUDA if present), 'cpu' or 'cuda'")
    parser.add_argument('--cache-dir',
                        help='UDF checkpoint cache (default ~/.cache/neural_bone_reg)')
    parser.add_argument('--backend', choices=('grid', 'neural'),
                        help='distance backend of the search (default: from the config)')
    parser.add_argument('--seed', type=int, help='registration seed (default: from the config)')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch intra-op threads (0: auto, half the CPUs available, 1-4)')


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
                    '[0, 100] mm, both seeded by (seed, k); the registration must undo it. '
                    'With --patch-mm R only the points within R mm of a seeded point of the '
                    'cloud are kept first. Each case and trial is compared with its floor '
                    '(robust ICP started at the truth).')
    bench.add_argument('--data', required=True, help='folder of NAME.stl + NAME.xyz pairs')
    bench.add_argument('--trials', type=int, default=10, help='trials per case')
    bench.add_argument('--cases', nargs='*', help='only these case names')
    bench.add_argument('--noise-mm', type=non_negative_float, default=0.0,
                       help='extra gaussian noise sigma added to the cloud, in mm')
    bench.add_argument('--patch-mm', type=non_negative_float, default=0.0,
                       help='keep only the points within this radius (mm) of a seeded point '
                            'of the cloud (0: the whole cloud)')
    bench.add_argument('--json', help='write results JSON here')
    bench.add_argument('--plot', help='write a PNG plot here')
    _add_common(bench)
    bench.set_defaults(func=run_bench)


def _configs(args: argparse.Namespace):
    """Return the configs the arguments name; warn of gates looser than calibrated (stderr)."""
    from neural_bone_reg.core.config import (Configs, configs_from_dict, load_yaml_configs,
                                             loosened_gates)

    configs = (load_yaml_configs(args.config, args.preset) if args.config
               else configs_from_dict({}, args.preset))
    cli_values = (('backend', args.backend), ('seed', args.seed))
    overrides = {k: v for k, v in cli_values if v is not None}
    if overrides:
        from dataclasses import replace
        configs = Configs(configs.udf, configs.train, replace(configs.registration, **overrides))
    for line in loosened_gates(configs.registration):
        print(f'warning: confidence gate looser than calibrated: {line}', file=sys.stderr)
    return configs


def _registrar(mesh: str, args: argparse.Namespace):
    from neural_bone_reg import BoneRegistrar
    from neural_bone_reg.core.runtime import configure_threads

    configure_threads(args.threads)
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

    from neural_bone_reg.core.io import dumps_json, load_cloud

    # The inputs and the output folder first: a bad one must not cost a UDF training.
    cloud = load_cloud(args.cloud)
    out = Path(args.out) if args.out else Path(args.cloud).with_suffix('.registration.json')
    if not out.parent.is_dir():
        raise ValueError(f'--out {out}: folder {out.parent} does not exist')
    reg = _registrar(args.mesh, args)
    res = reg.register(cloud)
    np.set_printoptions(precision=4, suppress=True)
    print('transform (cloud -> mesh frame, mm):')
    print(res.transform)
    print(f'accepted: {res.accepted}  residual {res.residual_mm:.2f} mm  inliers '
          f'{res.inlier_fraction:.2f}  ambiguity {res.ambiguity:.2f}  time {res.time_s:.2f} s')
    for reason in res.rejection_reasons:
        print(f'  rejected: {reason}')
    out.write_text(dumps_json(res.summary(), indent=2))
    print(f'saved {out}')
    return 0 if res.accepted else 1


def _print_row(case: str, r: dict[str, Any]) -> None:
    """Print one trial row of the bench."""
    if 'input_error' in r:
        print(f"{case} #{r['trial']}: {r['n_points']} points, input rejected: "
              f"{r['input_error']}", flush=True)
        return
    verdict = 'ok ' if r['success'] else 'BAD'
    decision = 'accepted' if r['accepted'] else 'rejected'
    flags = (' MISS' if r['search_miss'] else '') + (' =floor' if r['same_optimum'] else '')
    m2 = r['mahalanobis2_trial_floor']
    cover = f'  m2 {m2:.1f}' if m2 is not None else ''
    if r['bound_mm'] is not None:
        cover += f"  bound {r['bound_mm']:.2f} mm"
    print(f"{case} #{r['trial']}: RRE {r['rre_deg']:6.2f} deg  RTE {r['rte_mm']:6.2f} mm  "
          f"{verdict} {decision}  res {r['residual_mm']:.2f}  inl {r['inlier_fraction']:.2f}"
          f"  amb {r['ambiguity']:.2f}  {r['time_s']:.2f} s  n {r['n_points']}"
          f"  floor {r['floor_rre_deg']:.2f} deg {r['floor_rte_mm']:.2f} mm"
          f" res {r['floor_residual_mm']:.2f}{cover}{flags}", flush=True)


def _print_table(per_case: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    """Print the per-case and overall figures."""
    header = (f"{'case':<28}{'trials':>7}{'recall':>8}{'RRE deg':>9}{'RTE mm':>8}{'CD mm':>7}"
              f"{'t med s':>9}{'acc':>5}{'acc ok':>8}{'wrong acc':>10}{'ok rej':>7}"
              f"{'misses':>7}{'cov tr':>7}{'cov cs':>7}{'bnd mm':>7}")
    print('\n' + header)
    print('-' * len(header))
    fmt = (lambda v: f'{v:.2f}' if v is not None else '-')
    for name, s in [*per_case.items(), ('overall', summary)]:
        print(f"{name:<28}{s['trials']:>7}{s['recall']:>8.2f}{fmt(s['rre_mean_deg']):>9}"
              f"{fmt(s['rte_mean_mm']):>8}{fmt(s['chamfer_mean_mm']):>7}"
              f"{fmt(s['time_median_s']):>9}{s['accepted']:>5}{s['accepted_correct']:>8.2f}"
              f"{s['wrong_accepted']:>10}{s['correct_rejected']:>7}{s['search_misses']:>7}"
              f"{fmt(s['coverage_trial_floor']):>7}{fmt(s['coverage_case_floor']):>7}"
              f"{fmt(s['bound_median_mm']):>7}")

    def by_test(counts: dict[str, int]) -> str:
        return ', '.join(f'{test} {n}' for test, n in counts.items()) or 'none'

    print(f"\nreachable (own floor correct): {summary['reachable']} of {summary['trials']}; "
          f"refused, by the tests failed: correct {by_test(summary['correct_refused_by'])}; "
          f"wrong {by_test(summary['wrong_refused_by'])}")


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark protocol and print, save and plot the figures."""
    import platform
    import time

    import torch

    from neural_bone_reg.core import bench
    from neural_bone_reg.core.io import load_cloud

    data = Path(args.data)
    cases = bench.bench_cases(data, args.cases)
    if args.trials < 1:
        raise ValueError(f'--trials must be at least 1, got {args.trials}')
    rows: list[dict[str, Any]] = []
    train_times = {}
    floors = {}
    seed = args.seed if args.seed is not None else 0
    for case in cases:
        tick = time.perf_counter()
        reg = _registrar(str(data / f'{case}.stl'), args)
        train_times[case] = {'load_or_train_s': time.perf_counter() - tick,
                             'train_time_s': reg.model.train_time_s, **reg.model.accuracy}
        cloud = load_cloud(data / f'{case}.xyz')
        floor, case_rows = bench.run_case(
            reg, cloud, seed, args.trials, noise_mm=args.noise_mm, patch_mm=args.patch_mm,
            on_row=lambda r, case=case: _print_row(case, r))
        floors[case] = floor.summary()
        print(f'{case} floor (ICP from the truth, whole cloud): RRE {floor.rre_deg:.2f} deg  '
              f'RTE {floor.rte_mm:.2f} mm  res {floor.residual_mm:.2f}  '
              f'inl {floor.inlier_fraction:.2f}  {floor.iterations} iterations', flush=True)
        rows += [{'case': case, **r} for r in case_rows]

    per_case = {case: bench.summarise([r for r in rows if r['case'] == case]) for case in cases}
    summary = bench.summarise(rows)
    _print_table(per_case, summary)
    print('\ncase floors (ICP from the truth on the whole cloud):')
    for case, floor in floors.items():
        print(f"  {case:<28} RRE {floor['rre_deg']:.2f} deg  RTE {floor['rte_mm']:.2f} mm")
    configs = _configs(args)
    record = {
        'summary': summary, 'per_case': per_case, 'floors': floors, 'udf': train_times,
        'trials': rows,
        'protocol': {'seed': seed, 'trials': args.trials, 'noise_mm': args.noise_mm,
                     'patch_mm': args.patch_mm,
                     'max_translation_mm': bench.BENCH_MAX_TRANSLATION_MM,
                     'preset': args.preset},
        'config': {k: v for k, v in vars(configs.registration).items()},
        'machine': {'device': str(_registrar_device(args)), 'torch': torch.__version__,
                    'threads': torch.get_num_threads(),
                    'interop_threads': torch.get_num_interop_threads(),
                    'cpu': platform.processor() or platform.machine(),
                    'python': platform.python_version()},
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from neural_bone_reg.core.io import dumps_json

        Path(args.json).write_text(dumps_json(record, indent=2))
        print(f'saved {args.json}')
    if args.plot:
        plot_bench(rows, args.plot, title=f'{data.name}: recall {summary["recall"]:.2f}, '
                                          f'noise {args.noise_mm} mm, patch {args.patch_mm} mm, '
                                          f'preset {args.preset}')
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
    rows = [r for r in rows if 'input_error' not in r]  # no pose to plot
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
