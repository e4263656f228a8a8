"""The speed benchmark (tools/bench_speed.py) runs and its figures agree with one another (its timings live in the
benchmark, not here)."""

import re
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_benchmark_runs_on_a_few_synthetic_photos_and_its_figures_agree(capsys):
    sys.path.insert(0, str(REPO / 'tools'))
    import bench_speed  # its main() in this process (torch is imported already); its `train` runs are processes
    bench_speed.main(['--photos', '8', '--arch', 'mobilenet_v3_small', '--trials', '1'])
    out = capsys.readouterr().out
    peaks = re.search(r'matmul peaks measured now: fp32 (\d+), bf16 (\d+) GFLOP/s; mobilenet_v3_small: ([\d.]+) GFLOP', out)
    rows = re.findall(r'(\d+) crops, +([\d.]+) s in all, +([\d.]+) crops/s \(eager\); a crop: backbone ([\d.]+) ms, '
                      r'decoding and the rest ([\d.]+) ms \((\d+)%\); (\d+) GFLOP/s', out)
    assert peaks and len(rows) == 1, out  # at 8 photos, neither a warm compile cache nor N/4 is run,
    assert 'nothing compiled' in out and 'too few photos to compare memory' in out  # and it says why
    crops, seconds, rate, backbone, rest, share, gflops = map(float, rows[0])
    assert crops >= 8 and 0 < crops / rate < seconds  # the extraction is part of the whole run
    assert 1000 / rate == pytest.approx(backbone + rest, rel=0.25)  # a crop's parts add up to its time
    assert share == pytest.approx(100 * rest / (backbone + rest), abs=1)
    assert gflops == pytest.approx(rate * float(peaks.group(3)), abs=1)
