"""Safety benchmark: register each case's cloud to every *other* bone; none may be accepted.

Uses the real pairs NAME.stl + NAME.xyz (default ../shared/data/ultrabones_hip), including the
left cloud against the right femur (a mirror image: the wrong-side error). Each cloud is moved
by the bench protocol first (``neural_bone_reg.core.bench``; ``--patch-mm`` and ``--noise-mm``
as in ``neural-bone-reg bench``). Every acceptance is a wrong fit: prints ``wrong_accepted``
per bone and overall (target 0) and exits 1 if any.

    .venv/bin/python benchmarks/bench_wrong_bone.py --trials 3
    .venv/bin/python benchmarks/bench_wrong_bone.py --trials 3 --patch-mm 40
"""

from __future__ import annotations

import math
import sys

from bench_common import case_registrar, real_cases, real_data_parser

from neural_bone_reg.core.bench import bench_trial
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.io import dumps_json


def main() -> int:
    """Register every cloud to every other bone and count acceptances."""
    args = real_data_parser(__doc__, trials=3, perturbation=True).parse_args()

    cases, clouds = real_cases(args)
    rows = []
    for bone in cases:
        reg = case_registrar(args, bone)
        for source in cases:
            if source == bone:
                continue
            for trial in range(args.trials):
                moved, _ = bench_trial(clouds[source], args.seed, trial, args.noise_mm,
                                       args.patch_mm)
                try:
                    res = reg.register(moved)
                except InputError as exc:  # e.g. a pelvis cloud larger than a femur
                    rows.append({'bone': bone, 'cloud': source, 'trial': trial, 'accepted': False,
                                 'n_points': len(moved), 'reason': f'input rejected: {exc}'})
                else:
                    rows.append({'bone': bone, 'cloud': source, 'trial': trial,
                                 'n_points': len(moved),
                                 'accepted': res.accepted, 'residual_mm': res.residual_mm,
                                 'inlier_fraction': res.inlier_fraction,
                                 'ambiguity': res.ambiguity,
                                 'uniqueness_z': res.uniqueness_z,
                                 'bound_mm': res.bound_mm, 'bound_deg': res.bound_deg,
                                 'noise_mm': res.noise_mm,
                                 'reason': '; '.join(res.rejection_reasons)})
                r = rows[-1]
                print(f"{source} -> {bone} #{trial}: {'ACCEPTED' if r['accepted'] else 'rejected'}"
                      f" ({r['reason']})", flush=True)
    print(f"\n{'bone':<28}{'trials':>7}{'wrong_accepted':>16}")
    per_bone = {}
    for bone in cases:
        sub = [r for r in rows if r['bone'] == bone]
        per_bone[bone] = sum(r['accepted'] for r in sub)
        print(f'{bone:<28}{len(sub):>7}{per_bone[bone]:>16}')
    wrong_accepted = sum(per_bone.values())
    _print_margins(rows)
    print(f'wrong_accepted: {wrong_accepted} of {len(rows)} wrong-bone registrations '
          f"(noise {args.noise_mm} mm, patch {args.patch_mm or 'none'} mm; target 0)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(dumps_json({
            'wrong_accepted': wrong_accepted, 'per_bone': per_bone, 'rows': rows,
            'protocol': {'seed': args.seed, 'trials': args.trials, 'noise_mm': args.noise_mm,
                         'patch_mm': args.patch_mm}}, indent=2))
    return 0 if wrong_accepted == 0 else 1


def _print_margins(rows: list[dict]) -> None:
    """Print how close the wrong fits came to acceptance: the most unique, the most precise."""
    fits = [r for r in rows if 'uniqueness_z' in r]
    if not fits:
        return
    unique = max(fits, key=lambda r: -math.inf if math.isnan(r['uniqueness_z'])
                 else r['uniqueness_z'])
    precise = min(fits, key=lambda r: max(r['bound_mm'], r['bound_deg']))
    for label, r in (('most unique', unique), ('most precise', precise)):
        print(f"{label} wrong fit: {r['cloud']} -> {r['bone']} #{r['trial']}: uniqueness z "
              f"{r['uniqueness_z']:.2f}, 95 % bounds {r['bound_mm']:.2f} mm / "
              f"{r['bound_deg']:.2f} deg, noise {r['noise_mm']:.2f} mm")


if __name__ == '__main__':
    sys.exit(main())
