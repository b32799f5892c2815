"""Video-rate tracking on the real clouds: one global registration, then frame-to-frame ICP.

Per case, the real ultrasound cloud is placed by bench trial 0 of ``neural-bone-reg bench``
and registered globally. Then the bone moves on a seeded random walk (each frame rotates by a
gaussian step of ``--step-deg`` about a random axis through the cloud's centroid and shifts by
``--step-mm``), and every frame is a fresh random subset of ``--frame-points`` points of the
cloud with ``--noise-mm`` of gaussian noise, as an RGB-D frame of the same patch would be.
Each frame is tracked from the last accepted pose; a rejected frame falls back to a global
registration. Prints per-frame time, rate, accuracy and acceptance.

    .venv/bin/python benchmarks/bench_tracking.py --frames 200
"""

from __future__ import annotations

import argparse
import sys
import time

from bench_common import real_data_parser
import numpy as np
from scipy.spatial.transform import Rotation
import torch

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.core import metrics
from neural_bone_reg.core.bench import bench_cases, bench_trial
from neural_bone_reg.core.io import dumps_json, load_cloud
from neural_bone_reg.core.se3 import apply_transform, invert_transform, make_transform


def _walk_step(rng: np.random.Generator, centre: np.ndarray, step_deg: float,
               step_mm: float) -> np.ndarray:
    """Return a small rigid motion: rotation about ``centre`` plus a shift."""
    rotation = Rotation.from_rotvec(np.radians(step_deg) * rng.normal(size=3)).as_matrix()
    shift = step_mm * rng.normal(size=3)
    return make_transform(rotation, centre - rotation @ centre + shift)


def run_case(reg: BoneRegistrar, cloud: np.ndarray, args: argparse.Namespace,
             case: str) -> list[dict]:
    """Track one case for ``args.frames`` frames; return per-frame rows."""
    rng = np.random.default_rng(args.seed)
    moved, truth = bench_trial(cloud, args.seed, 0, 0.0)  # truth: moved -> bone
    robot_from_bone = invert_transform(truth)
    bone_points = apply_transform(truth, moved)
    prior = None
    rows = []
    for frame in range(args.frames):
        centre = apply_transform(robot_from_bone, bone_points.mean(axis=0)[None])[0]
        robot_from_bone = _walk_step(rng, centre, args.step_deg, args.step_mm) @ robot_from_bone
        pick = bone_points[rng.choice(len(bone_points), args.frame_points, replace=False)]
        points = apply_transform(robot_from_bone, pick) + rng.normal(scale=args.noise_mm,
                                                                     size=pick.shape)
        truth = invert_transform(robot_from_bone)
        tick = time.perf_counter()
        tracked = reg.track(points, prior) if prior is not None else None
        res = tracked if tracked is not None and tracked.accepted else reg.register(points)
        elapsed = time.perf_counter() - tick
        prior = res.transform if res.accepted else None
        rre = metrics.rre_deg(res.transform, truth)
        rte = metrics.rte_mm(res.transform, truth, points)
        rows.append({'case': case, 'frame': frame, 'method': res.method,
                     'accepted': res.accepted, 'success': metrics.is_success(rre, rte),
                     'rre_deg': rre, 'rte_mm': rte, 'time_s': elapsed,
                     'constraint': res.constraint, 'reasons': list(res.rejection_reasons),
                     'lost_because': ([] if tracked is None or tracked.accepted
                                      else list(tracked.rejection_reasons))})
    return rows


def _summary(rows: list[dict]) -> str:
    tracked = [r for r in rows if r['method'] == 'track']
    accepted = [r for r in rows if r['accepted']]
    wrong = [r for r in accepted if not r['success']]
    times = np.array([r['time_s'] for r in tracked]) if tracked else np.array([np.nan])
    rre = np.mean([r['rre_deg'] for r in accepted]) if accepted else float('nan')
    rte = np.mean([r['rte_mm'] for r in accepted]) if accepted else float('nan')
    return (f'{len(rows)} frames: {len(tracked)} tracked, {len(rows) - len(tracked)} global; '
            f'accepted {len(accepted)} ({len(wrong)} wrong); RRE {rre:.2f} deg, RTE {rte:.2f} mm '
            f'on accepted; tracked frame median {1000 * np.median(times):.1f} ms, p95 '
            f'{1000 * np.percentile(times, 95):.1f} ms ({1.0 / np.median(times):.0f} Hz)')


def main() -> int:
    """Track every case and print the figures."""
    parser = real_data_parser(__doc__)
    parser.add_argument('--frames', type=int, default=200)
    parser.add_argument('--frame-points', type=int, default=2000)
    parser.add_argument('--step-deg', type=float, default=0.5,
                        help='std of the per-frame rotation step about each axis, deg')
    parser.add_argument('--step-mm', type=float, default=0.5,
                        help='std of the per-frame shift along each axis, mm')
    parser.add_argument('--noise-mm', type=float, default=0.5)
    parser.add_argument('--track-points', type=int, default=None,
                        help='override registration.track_points')
    args = parser.parse_args()

    cases = bench_cases(args.data, args.cases)
    rows = []
    for case in cases:
        overrides = {'track_points': args.track_points} if args.track_points else {}
        reg = BoneRegistrar.from_mesh(args.data / f'{case}.stl', device=args.device,
                                      cache_dir=args.cache_dir, **overrides)
        case_rows = run_case(reg, load_cloud(args.data / f'{case}.xyz'), args, case)
        print(f'{case}: {_summary(case_rows)}', flush=True)
        rows += case_rows
    print(f'all: {_summary(rows)}')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(dumps_json({'args': {k: str(v) for k, v in vars(args).items()},
                                         'torch': torch.__version__,
                                         'threads': torch.get_num_threads(),
                                         'device': str(reg.device), 'rows': rows}, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
