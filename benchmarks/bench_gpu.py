"""GPU bench: UDF training, the default and paper presets, short sweeps and tracking, one table.

Per real case (``NAME.stl`` + ``NAME.xyz``, the cloud in the mesh frame) it runs, on
``--device`` (default ``cuda``), in this order so that the rows that matter most come first:

* ``udf-train``: the bone's UDF trained from scratch (fresh temporary cache, default configs);
  the registrations below use this model;
* ``default`` and ``paper``: the presets of ``neural_bone_reg.core.config.registration_preset``
  on the bench protocol's trials (``neural_bone_reg.core.bench.bench_trial``: the whole cloud,
  rotated uniformly on SO(3) and shifted by up to 100 mm);
* ``sweep-<R>mm``: short sweeps, the default preset on patches (the points within R mm of a
  seeded point of the cloud, R = 60, 40, 25 mm);
* ``track``: one global registration, then ``BoneRegistrar.track`` from the previous pose over
  a seeded random walk of the bone (the protocol of ``bench_tracking.py``), falling back to a
  global registration when a frame is rejected.

Every timed call is wrapped by ``torch.cuda.synchronize()`` on both sides and preceded by an
untimed warm-up of the same configuration. Recall counts RRE < 5 deg and RTE < 4 mm; RRE and RTE
are means over the successful trials. ``--budget-s`` bounds the whole run: once it is spent,
the remaining trials and rows are skipped (and say so), so that one call always ends in time.
The JSON (``--json``) is rewritten after every row, so a run cut short still leaves its rows.

    benchmarks/run_gpu_bench.sh --prepare        # here: wheels and data into out/gpu_carry
    bash benchmarks/run_gpu_bench.sh             # there (carry out/gpu_carry): venv, then this
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --tiny --json out/gpu_tiny.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import json
import os
from pathlib import Path
import platform
import sys
import tempfile
import time
from typing import Any, Callable

from bench_common import DEFAULT_DATA
import numpy as np
import torch

#: Trials per row of a full run: the paper preset (5000 hypotheses x 1000 steps) gets few.
TRIALS = {'default': 5, 'paper': 2, 'sweep': 5}
#: Patch radii of the short sweeps, mm.
SWEEP_RADII_MM = (60.0, 40.0, 25.0)
#: Tracking: frames per case, points per frame, and the walk (as bench_tracking.py's defaults).
TRACK_FRAMES = 100
TRACK_FRAME_POINTS = 2000
TRACK_STEP_DEG = 0.5
TRACK_STEP_MM = 0.5
TRACK_NOISE_MM = 0.5
#: Whole-run budget: under the 8 minutes of one device call, with the set-up's share left out.
DEFAULT_BUDGET_S = 330.0
#: The paper preset's warm-up runs its shapes with this many steps per stage, not 1000.
PAPER_WARMUP_ITERATIONS = 10
#: The order of the rows of one case.
SCENARIOS = ('udf-train', 'default', 'paper', 'sweep', 'track')

#: ``--tiny``: a smoke run of every row in well under a minute on two CPU cores.
TINY_UDF = {'hidden_dim': 32, 'num_hidden_layers': 2}
TINY_TRAIN = {'iterations': 60, 'batch_size': 512, 'num_samples': 5_000, 'grid_voxel_mm': 4.0,
              'num_surface_points': 2_000}
TINY_REGISTRATION = {'num_hypotheses': 64, 'coarse_iterations': 6, 'coarse_prune_every': 3,
                     'fine_top_k': 8, 'patch_fine_top_k': 16, 'fine_points': 256,
                     'fine_iterations': 5, 'final_candidates': 2, 'refine_iterations': 5}
TINY_TRACK_FRAMES = 3


@dataclass
class Budget:
    """Seconds left of the run; a row or trial starts only while some are left."""

    total_s: float
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.monotonic()

    def left(self) -> float:
        """Return the seconds left (negative once overspent)."""
        return self.total_s - (time.monotonic() - self.start)

    def allows(self, expected_s: float = 0.0) -> bool:
        """Return whether a step expected to take ``expected_s`` still fits."""
        return self.left() > expected_s


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Return ``fn()`` and its wall time in s, the device synchronised before and after."""
    synchronize(device)
    tick = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - tick


def environment(device: torch.device) -> dict[str, Any]:
    """Return the record of the machine: device name, torch and CUDA versions, threads."""
    info: dict[str, Any] = {
        'device': str(device), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        'python': platform.python_version(), 'platform': platform.platform(),
        'cpu_count': os.cpu_count(), 'threads': torch.get_num_threads(),
        'interop_threads': torch.get_num_interop_threads(),
    }
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_memory_gib=props.total_memory / 2 ** 30,
                    multiprocessors=props.multi_processor_count,
                    capability=f'{props.major}.{props.minor}')
    else:
        info['device_name'] = platform.processor() or platform.machine()
    return info


def summarise(case: str, scenario: str, planned: int, trials: list[dict[str, Any]],
              note: str = '') -> dict[str, Any]:
    """Return one table row from per-trial dicts (success, rre_deg, rte_mm, time_s, accepted)."""
    ok = [t for t in trials if t.get('success')]
    times = [t['time_s'] for t in trials if t.get('time_s') is not None]
    accepted = [t for t in trials if t.get('accepted')]
    wrong = sum(1 for t in accepted if not t.get('success'))
    skipped = planned - len(trials)
    notes = [note] if note else []
    if trials and 'accepted' in trials[0]:
        notes.append(f'accepted {len(accepted)}, wrong accepted {wrong}')
    if skipped > 0:
        notes.append(f'{skipped} of {planned} skipped: time budget spent')
    return {
        'case': case, 'scenario': scenario, 'trials': len(trials), 'planned': planned,
        'recall': len(ok) / len(trials) if trials and 'success' in trials[0] else None,
        'rre_mean_deg': float(np.mean([t['rre_deg'] for t in ok])) if ok else None,
        'rte_mean_mm': float(np.mean([t['rte_mm'] for t in ok])) if ok else None,
        'time_median_s': float(np.median(times)) if times else None,
        'time_p95_s': float(np.percentile(times, 95)) if times else None,
        'accepted': len(accepted), 'wrong_accepted': wrong, 'note': '; '.join(notes),
        'per_trial': trials,
    }


def _trial(registrar: Any, moved: np.ndarray, truth: np.ndarray,
           device: torch.device) -> dict[str, Any]:
    """Register one perturbed cloud, timed; return its figures."""
    from neural_bone_reg.core import metrics
    from neural_bone_reg.core.errors import InputError

    try:
        res, elapsed = timed(lambda: registrar.register(moved), device)
    except InputError as exc:
        return {'success': False, 'accepted': False, 'time_s': None, 'rre_deg': None,
                'rte_mm': None, 'n_points': int(len(moved)), 'input_error': str(exc)}
    rre = float(metrics.rre_deg(res.transform, truth))
    rte = float(metrics.rte_mm(res.transform, truth, moved))
    return {'success': bool(metrics.is_success(rre, rte)), 'accepted': bool(res.accepted),
            'rre_deg': rre, 'rte_mm': rte, 'time_s': elapsed, 'n_points': int(len(moved)),
            'registrar_time_s': res.time_s}


def registration_row(case: str, scenario: str, registrar: Any, cloud: np.ndarray,
                     trials: int, patch_mm: float, args: argparse.Namespace,
                     budget: Budget, warmup: Any = None) -> dict[str, Any]:
    """Run ``trials`` seeded bench trials after one untimed warm-up; return the row."""
    from neural_bone_reg.core.bench import bench_trial, WARMUP_TRIAL
    from neural_bone_reg.core.errors import InputError

    device = registrar.device
    moved, _ = bench_trial(cloud, args.seed, WARMUP_TRIAL, 0.0, patch_mm)
    try:
        timed(lambda: (warmup or registrar).register(moved), device)
    except InputError:
        pass  # a warm-up patch too small to register still warmed the kernels it reached
    rows: list[dict[str, Any]] = []
    for trial in range(trials):
        expected = float(np.median([r['time_s'] for r in rows if r['time_s']] or [0.0]))
        if not budget.allows(expected):
            break
        moved, truth = bench_trial(cloud, args.seed, trial, 0.0, patch_mm)
        rows.append({'trial': trial, **_trial(registrar, moved, truth, device)})
    return summarise(case, scenario, trials, rows)


def tracking_row(case: str, registrar: Any, cloud: np.ndarray, frames: int,
                 args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Track a seeded random walk from one global registration; return the row (per frame)."""
    from bench_tracking import _walk_step

    from neural_bone_reg.core import metrics
    from neural_bone_reg.core.bench import bench_trial
    from neural_bone_reg.core.se3 import apply_transform, invert_transform

    device = registrar.device
    rng = np.random.default_rng(args.seed)
    moved, truth = bench_trial(cloud, args.seed, 0, 0.0)
    bone_points = apply_transform(truth, moved)
    robot_from_bone = invert_transform(truth)
    count = min(TRACK_FRAME_POINTS, len(bone_points))
    first, _ = timed(lambda: registrar.register(moved), device)  # also the warm-up
    prior = first.transform if first.accepted else None
    timed(lambda: registrar.track(moved, first.transform), device)  # warm-up of track
    rows: list[dict[str, Any]] = []
    for frame in range(frames):
        if not budget.allows():
            break
        centre = apply_transform(robot_from_bone, bone_points.mean(axis=0)[None])[0]
        robot_from_bone = _walk_step(rng, centre, TRACK_STEP_DEG, TRACK_STEP_MM) @ robot_from_bone
        pick = bone_points[rng.choice(len(bone_points), count, replace=False)]
        points = apply_transform(robot_from_bone, pick) + rng.normal(scale=TRACK_NOISE_MM,
                                                                     size=pick.shape)

        def step(points: np.ndarray = points, prior: Any = prior) -> Any:
            tracked = registrar.track(points, prior) if prior is not None else None
            return tracked if tracked is not None and tracked.accepted else (
                registrar.register(points))

        res, elapsed = timed(step, device)
        truth = invert_transform(robot_from_bone)
        rre = float(metrics.rre_deg(res.transform, truth))
        rte = float(metrics.rte_mm(res.transform, truth, points))
        prior = res.transform if res.accepted else None
        rows.append({'frame': frame, 'method': res.method, 'accepted': bool(res.accepted),
                     'success': bool(metrics.is_success(rre, rte)), 'rre_deg': rre, 'rte_mm': rte,
                     'time_s': elapsed})
    tracked = sum(r['method'] == 'track' for r in rows)
    return summarise(case, 'track', frames, rows,
                     note=f'{tracked} of {len(rows)} frames tracked, the rest registered')


def udf_row(case: str, mesh: Path, configs: Any, device: torch.device) -> tuple[dict, Any]:
    """Train the bone's UDF from scratch on ``device``, timed; return the row and the model."""
    from neural_bone_reg.core.udf import train_or_load

    with tempfile.TemporaryDirectory(prefix='bench_gpu_udf_') as cache:
        model, elapsed = timed(lambda: train_or_load(mesh, cache, configs.udf, configs.train,
                                                     device=device), device)
    acc = model.accuracy
    note = (f"MAE within {acc.get('band_mm', 10):g} mm: neural {acc['neural_mae_mm']:.3f} mm, "
            f"grid {acc['grid_mae_mm']:.3f} mm")
    row = summarise(case, 'udf-train', 1, [{'time_s': elapsed}], note=note)
    row.update(neural_mae_mm=acc['neural_mae_mm'], grid_mae_mm=acc['grid_mae_mm'],
               train_time_s=model.train_time_s)
    return row, model


def _fmt(value: float | None, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Return the one table of the run (text, one line per row)."""
    head = (f'{"case":<24} {"scenario":<11} {"trials":>6} {"recall":>6} {"RRE deg":>8} '
            f'{"RTE mm":>7} {"median s":>9} {"p95 s":>8}  note')
    lines = [head, '-' * len(head)]
    for r in rows:
        lines.append(
            f'{r["case"]:<24} {r["scenario"]:<11} {r["trials"]:>6} {_fmt(r["recall"], ".2f"):>6} '
            f'{_fmt(r["rre_mean_deg"], ".2f"):>8} {_fmt(r["rte_mean_mm"], ".2f"):>7} '
            f'{_fmt(r["time_median_s"], ".3f"):>9} {_fmt(r["time_p95_s"], ".3f"):>8}  '
            f'{r["note"]}')
    return '\n'.join(lines)


def _write_json(path: Path | None, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(json.dumps({'meta': meta, 'rows': rows}, indent=2, default=str))
    os.replace(tmp, path)


def _skipped(case: str, scenario: str, planned: int) -> dict[str, Any]:
    return summarise(case, scenario, planned, [], note='time budget spent before it started')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda', help="'cuda' (default), 'cuda:N' or 'cpu'")
    parser.add_argument('--data', type=Path, default=DEFAULT_DATA,
                        help='folder of NAME.stl + NAME.xyz pairs (clouds in the mesh frame)')
    parser.add_argument('--cases', nargs='*', help='only these NAMEs')
    parser.add_argument('--scenarios', nargs='*', choices=SCENARIOS, default=list(SCENARIOS),
                        help='rows to run per case (default: all)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--budget-s', type=float, default=DEFAULT_BUDGET_S,
                        help='stop starting trials and rows once this many seconds have passed')
    parser.add_argument('--trials', type=int, help='trials per registration row (default: '
                        f'{TRIALS}; 1 with --tiny)')
    parser.add_argument('--frames', type=int, help=f'tracking frames (default {TRACK_FRAMES})')
    parser.add_argument('--tiny', action='store_true',
                        help='smoke run: one case, 1 trial per row, tiny UDF and searches')
    parser.add_argument('--json', type=Path, help='write the table and the record here')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the table; return 0 if every row ran, 1 if the budget cut some."""
    args = parse_args(argv)
    from neural_bone_reg import BoneRegistrar
    from neural_bone_reg.core.bench import bench_cases
    from neural_bone_reg.core.config import as_dict, configs_from_dict, registration_preset
    from neural_bone_reg.core.io import load_cloud
    from neural_bone_reg.core.registrar import resolve_device
    from neural_bone_reg.core.runtime import configure_threads

    budget = Budget(args.budget_s)
    configure_threads()
    device = resolve_device(args.device)
    if device.type == 'cuda':
        torch.cuda.init()
    tiny = args.tiny
    configs = configs_from_dict({'udf': TINY_UDF, 'train': TINY_TRAIN} if tiny else {})
    reg_overrides = TINY_REGISTRATION if tiny else {}
    presets = {name: registration_preset(name, **reg_overrides) for name in ('default', 'paper')}
    paper_warmup = registration_preset(
        'paper', **{**reg_overrides, 'coarse_iterations': PAPER_WARMUP_ITERATIONS,
                    'fine_iterations': PAPER_WARMUP_ITERATIONS})
    trials = {k: (args.trials or (1 if tiny else v)) for k, v in TRIALS.items()}
    frames = args.frames or (TINY_TRACK_FRAMES if tiny else TRACK_FRAMES)
    cases = bench_cases(args.data, args.cases)[:1 if tiny else None]

    meta = {'environment': environment(device), 'args': {k: str(v) for k, v in vars(args).items()},
            'trials': trials, 'frames': frames, 'sweep_radii_mm': list(SWEEP_RADII_MM),
            'udf_config': as_dict(configs.udf), 'train_config': as_dict(configs.train),
            'presets': {k: as_dict(v) for k, v in presets.items()}, 'cases': cases}
    env = meta['environment']
    print(f"device {env['device_name']} ({device}), torch {env['torch']}, CUDA {env['cuda']}, "
          f"{env['threads']} CPU threads; budget {args.budget_s:.0f} s", flush=True)

    models: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        meta['elapsed_s'] = budget.total_s - budget.left()
        _write_json(args.json, meta, rows)

    clouds = {case: load_cloud(args.data / f'{case}.xyz') for case in cases}
    registrars: dict[str, Any] = {}
    order = [(s, c) for s in SCENARIOS if s in args.scenarios for c in cases]
    if 'udf-train' not in args.scenarios:
        order = [('load', c) for c in cases] + order
    for scenario, case in order:
        if scenario in ('udf-train', 'load'):
            if scenario == 'load':  # no training row asked for: train or load from the cache
                registrars[case] = BoneRegistrar.from_mesh(
                    args.data / f'{case}.stl', device=device, configs=configs)
                continue
            if not budget.allows():
                add(_skipped(case, scenario, 1))
                continue
            row, models[case] = udf_row(case, args.data / f'{case}.stl', configs, device)
            registrars[case] = BoneRegistrar(models[case], presets['default'], device)
            add(row)
            continue
        reg = registrars.get(case)
        if reg is None:  # its model was skipped: nothing to register against
            add(_skipped(case, scenario, 1))
            continue
        cloud = clouds[case]
        if scenario == 'default':
            add(registration_row(case, 'default', reg, cloud, trials['default'], 0.0, args,
                                 budget) if budget.allows() else
                _skipped(case, scenario, trials['default']))
        elif scenario == 'paper':
            paper = reg.with_config(presets['paper'])
            add(registration_row(case, 'paper', paper, cloud, trials['paper'], 0.0, args,
                                 budget, warmup=reg.with_config(paper_warmup))
                if budget.allows() else _skipped(case, scenario, trials['paper']))
        elif scenario == 'sweep':
            for radius in SWEEP_RADII_MM:
                name = f'sweep-{radius:g}mm'
                add(registration_row(case, name, reg, cloud, trials['sweep'], radius, args,
                                     budget) if budget.allows() else
                    _skipped(case, name, trials['sweep']))
        elif scenario == 'track':
            add(tracking_row(case, reg, cloud, frames, args, budget) if budget.allows() else
                _skipped(case, scenario, frames))

    meta['elapsed_s'] = budget.total_s - budget.left()
    _write_json(args.json, meta, rows)
    print()
    print(format_table(rows))
    print(f"{len(rows)} rows in {meta['elapsed_s']:.0f} s on {env['device_name']} ({device}); "
          f"torch {env['torch']}, CUDA {env['cuda']}")
    complete = all(r['trials'] == r['planned'] for r in rows)
    if not complete:
        print('the time budget cut some rows short (see their notes)')
    return 0 if complete else 1


if __name__ == '__main__':
    sys.exit(main())
