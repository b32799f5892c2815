"""UDF training time and field accuracy per bone: wall and CPU time, MAE neural and grid.

Each mesh is trained from scratch into a fresh temporary cache (``train_or_load``, as
``neural-bone-reg train-udf`` does), with the torch threads set by ``--threads``. Prints one
row per mesh and repeat: wall time, CPU time of the process (``time.process_time()``, the
figure to trust on a shared machine), the load average before and after, and the mean
absolute error within 10 mm of the surface of the MLP and of the grid.

    .venv/bin/python benchmarks/bench_udf.py ../shared/data/ultrabones_hip/*.stl --threads 2

Run it with another ``PYTHONPATH`` to time another version of the package on the same bones.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import tempfile
import time

import torch

from neural_bone_reg.core import udf
from neural_bone_reg.core.config import load_yaml_configs, TrainConfig, UdfConfig
from neural_bone_reg.core.runtime import configure_threads


def _load() -> float:
    return os.getloadavg()[0]


def train_row(mesh: Path, udf_config: UdfConfig, train_config: TrainConfig,
              device: str) -> dict:
    """Train one bone into a fresh cache; return its timing and accuracy row."""
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix='bench_udf_') as cache:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        model = udf.train_or_load(mesh, cache, udf_config, train_config, device=device)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    acc = model.accuracy
    return {'mesh': mesh.stem, 'wall_s': wall, 'cpu_s': cpu, 'train_time_s': model.train_time_s,
            'neural_mae_mm': acc['neural_mae_mm'], 'grid_mae_mm': acc['grid_mae_mm'],
            'grid_vs_neural_mae_mm': acc.get('grid_vs_neural_mae_mm'),
            'grid_shape': list(model.grid.values.shape), 'load_before': load_before,
            'load_after': _load(), 'udf_module': udf.__file__}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('meshes', nargs='+', type=Path, help='bone meshes (STL/PLY/OBJ), mm')
    parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
    parser.add_argument('--repeats', type=int, default=1, help='trainings per mesh')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--config', help='YAML with udf/train sections (default: defaults)')
    parser.add_argument('--json', type=Path, help='append the rows here (JSON lines)')
    args = parser.parse_args(argv)

    threads = configure_threads(args.threads, 1)
    configs = load_yaml_configs(args.config) if args.config else None
    udf_config = configs.udf if configs else UdfConfig()
    train_config = configs.train if configs else TrainConfig()
    print(f'torch {torch.__version__}, threads {threads}, device {args.device}, '
          f'{udf.__file__}', file=sys.stderr)
    print(f'{"mesh":<28} {"wall s":>7} {"cpu s":>7} {"load":>9} {"neural":>7} {"grid":>7}')
    for _ in range(args.repeats):
        for mesh in args.meshes:
            row = train_row(mesh, udf_config, train_config, args.device)
            row.update(threads=threads, torch=torch.__version__, device=args.device)
            print(f'{row["mesh"]:<28} {row["wall_s"]:7.1f} {row["cpu_s"]:7.1f} '
                  f'{row["load_before"]:4.1f}-{row["load_after"]:<4.1f} '
                  f'{row["neural_mae_mm"]:7.3f} {row["grid_mae_mm"]:7.3f}', flush=True)
            if args.json:
                with args.json.open('a') as out:
                    out.write(json.dumps(row) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
