"""Where a registration spends its time: per-stage medians for full sweeps and short sweeps.

Runs the bench protocol (``neural_bone_reg.core.bench``) on the real cases and prints the
median wall time of each stage of ``BoneRegistrar.register`` (coarse, fine, rescore, refine,
assess), the total, and the CPU time, with the torch thread settings in use. ``--profile``
adds the top functions by cumulative time (cProfile) of one registration per scenario.

    .venv/bin/python benchmarks/bench_profile.py --trials 3 --patch-mm 0 25
"""

from __future__ import annotations

import cProfile
import io
import json
import platform
import pstats
import sys
import time

from bench_common import real_data_parser
import numpy as np
import torch

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.core.bench import bench_cases, bench_trial, patch_indices
from neural_bone_reg.core.io import load_cloud
from neural_bone_reg.core.runtime import configure_threads

STAGES = ('coarse_s', 'fine_s', 'rescore_s', 'refine_s', 'assess_s')
#: Seed index of the untimed warm-up registration, outside the trial range.
WARMUP_TRIAL = 2 ** 31 - 1
#: Functions shown per scenario with --profile.
PROFILE_TOP = 15


def main() -> int:
    """Profile registrations scenario by scenario and print the stage table."""
    parser = real_data_parser(__doc__, trials=3)
    parser.add_argument('--patch-mm', type=float, nargs='*', default=[0.0, 25.0],
                        help='patch radii to profile (0: the full sweep)')
    parser.add_argument('--threads', type=int, default=0, help='torch intra-op threads (0 auto)')
    parser.add_argument('--profile', action='store_true', help='print cProfile top functions')
    args = parser.parse_args()
    intra, inter = configure_threads(args.threads, 0)
    rows = []
    for case in bench_cases(args.data, args.cases):
        reg = BoneRegistrar.from_mesh(args.data / f'{case}.stl', device=args.device,
                                      cache_dir=args.cache_dir)
        cloud = load_cloud(args.data / f'{case}.xyz')
        reg.register(bench_trial(cloud, args.seed, WARMUP_TRIAL, 0.0)[0])  # warm-up
        for radius in args.patch_mm:
            for trial in range(args.trials):
                pts = cloud[patch_indices(cloud, args.seed, trial, radius)] if radius else cloud
                moved, _ = bench_trial(pts, args.seed, trial, 0.0)
                cpu = time.process_time()
                profiler = cProfile.Profile() if args.profile and trial == 0 else None
                if profiler:
                    profiler.enable()
                res = reg.register(moved)
                if profiler:
                    profiler.disable()
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats('cumulative').print_stats(
                        PROFILE_TOP)
                    print(f'--- {case} patch {radius:g} mm ---\n{text.getvalue()}')
                rows.append({'case': case, 'patch_mm': radius, 'trial': trial,
                             'n_points': len(moved), 'total_s': res.time_s,
                             'cpu_s': time.process_time() - cpu,
                             **{k: res.timings.get(k, float('nan')) for k in STAGES}})
                print(json.dumps(rows[-1]), flush=True)
    print(f'\ntorch {torch.__version__}, {intra} intra-op / {inter} inter-op threads, '
          f'{platform.processor() or platform.machine()}, device {reg.device}')
    header = f"{'scenario':<12}{'n':>4}" + ''.join(f'{s[:-2]:>9}' for s in STAGES) + \
        f"{'total':>9}{'cpu':>9}"
    print(header + '\n' + '-' * len(header))
    for radius in args.patch_mm:
        sub = [r for r in rows if r['patch_mm'] == radius]
        name = 'full sweep' if not radius else f'patch {radius:g}'
        keys = (*STAGES, 'total_s', 'cpu_s')
        medians = [float(np.median([r[key] for r in sub])) for key in keys]
        print(f'{name:<12}{len(sub):>4}' + ''.join(f'{m:>9.3f}' for m in medians))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
