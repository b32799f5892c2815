"""Safety benchmark: register each case's cloud to every *other* bone; none may be accepted.

Uses the real pairs NAME.stl + NAME.xyz (default ../shared/data/ultrabones_hip), including the
left cloud against the right femur (a mirror image: the wrong-side error). Each cloud is moved
by the bench protocol first. Prints how many wrong-bone registrations were accepted (target 0).

    .venv/bin/python benchmarks/bench_wrong_bone.py --trials 3
"""

from __future__ import annotations

import json
import sys

from bench_common import real_data_parser

from neural_bone_reg import BoneRegistrar
from neural_bone_reg.cli.commands import bench_cases, bench_trial
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.io import load_cloud


def main() -> int:
    """Register every cloud to every other bone and count acceptances."""
    args = real_data_parser(__doc__, trials=3).parse_args()

    cases = bench_cases(args.data, args.cases)
    clouds = {case: load_cloud(args.data / f'{case}.xyz') for case in cases}
    rows = []
    for bone in cases:
        reg = BoneRegistrar.from_mesh(args.data / f'{bone}.stl', device=args.device,
                                      cache_dir=args.cache_dir)
        for source in cases:
            if source == bone:
                continue
            for trial in range(args.trials):
                moved, _ = bench_trial(clouds[source], args.seed, trial, 0.0)
                try:
                    res = reg.register(moved)
                except InputError as exc:  # e.g. a pelvis cloud larger than a femur
                    rows.append({'bone': bone, 'cloud': source, 'trial': trial, 'accepted': False,
                                 'reason': f'input rejected: {exc}'})
                else:
                    rows.append({'bone': bone, 'cloud': source, 'trial': trial,
                                 'accepted': res.accepted, 'residual_mm': res.residual_mm,
                                 'inlier_fraction': res.inlier_fraction,
                                 'ambiguity': res.ambiguity,
                                 'reason': '; '.join(res.rejection_reasons)})
                r = rows[-1]
                print(f"{source} -> {bone} #{trial}: {'ACCEPTED' if r['accepted'] else 'rejected'}"
                      f" ({r['reason']})", flush=True)
    accepted = sum(r['accepted'] for r in rows)
    print(f'\nwrong-bone registrations accepted: {accepted} of {len(rows)}')
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if accepted == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
