"""benchmarks/bench_gpu.py on the CPU: a tiny run of every row, and the time budget."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / 'benchmarks' / 'bench_gpu.py'
#: The rows of one case, in the order the bench runs them.
SCENARIOS = ['udf-train', 'default', 'paper', 'sweep-60mm', 'sweep-40mm', 'sweep-25mm', 'track']
#: Column heads of the one table.
COLUMNS = ('case', 'scenario', 'trials', 'recall', 'RRE deg', 'RTE mm', 'median s', 'p95 s')


def _run(shared_data: Path, tmp_path: Path, *extra: str) -> tuple[Any, dict]:
    """Run the bench tiny on the CPU; return the process and its JSON record."""
    out = tmp_path / 'bench_gpu.json'
    proc = subprocess.run(
        [sys.executable, str(BENCH), '--device', 'cpu', '--tiny', '--data',
         str(shared_data / 'ultrabones_hip'), '--json', str(out), *extra],
        capture_output=True, text=True, timeout=600, check=False)
    assert out.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_tiny_run_prints_one_table_and_saves_every_row(shared_data, tmp_path):
    proc, record = _run(shared_data, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = record['rows']
    assert [r['scenario'] for r in rows] == SCENARIOS
    assert len({r['case'] for r in rows}) == 1  # --tiny: one case
    for row in rows:
        assert row['trials'] == row['planned'], row
        assert row['time_median_s'] > 0 and row['time_p95_s'] >= row['time_median_s'], row
    assert all(r['trials'] == 1 for r in rows if r['scenario'] != 'track')
    track = rows[-1]
    assert track['trials'] == 3 and len(track['per_trial']) == 3
    assert all(0.0 <= r['recall'] <= 1.0 for r in rows[1:])
    udf_row = rows[0]
    assert udf_row['recall'] is None and 0 < udf_row['neural_mae_mm'] < 5.0
    env = record['meta']['environment']
    for key in ('device', 'device_name', 'torch', 'cuda', 'threads'):
        assert key in env, key
    assert env['device'] == 'cpu'
    # One table at the end: the header, then one line per row.
    lines = proc.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith('case '))
    assert all(column in lines[header] for column in COLUMNS)
    table = lines[header + 2:header + 2 + len(SCENARIOS)]
    assert [line.split()[1] for line in table] == SCENARIOS


def test_spent_budget_skips_rows_and_says_so(shared_data, tmp_path):
    proc, record = _run(shared_data, tmp_path, '--budget-s', '0', '--scenarios', 'udf-train',
                        'default')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = record['rows']
    assert [r['scenario'] for r in rows] == ['udf-train', 'default']
    assert all(r['trials'] == 0 and 'budget' in r['note'] for r in rows)
    assert 'budget' in proc.stdout


def test_an_unknown_scenario_is_refused():
    proc = subprocess.run([sys.executable, str(BENCH), '--scenarios', 'nonsense'],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and 'invalid choice' in proc.stderr
