"""The attnbench command line and the efficiency benchmark's bookkeeping."""

from __future__ import annotations

import json
import math

import pytest

from runners.cli import main
from runners.efficiency import efficiency_length, scaling_exponent

pytestmark = pytest.mark.runner


def test_zoo_json_lists_every_mechanism(capsys):
    assert main(["zoo", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    lavo = next(r for r in rows if r["name"] == "lavo")
    assert lavo["causal_cross"] and lavo["decoding"]
    assert lavo["hyperparameters"]["w"] == {"type": "int", "default": 16}


def test_efficiency_writes_one_record_per_cell(tmp_path, capsys):
    code = main(["efficiency", "--attention", "softmax,lavo", "--attention-args", "lavo:r=8,w=4",
                 "--patterns", "causal_self,noncausal_cross", "--lengths", "16,32",
                 "--heads", "2", "--head-dim", "8", "--repeats", "2", "--warmup", "1",
                 "--device", "cpu", "--results-dir", str(tmp_path)])
    assert code == 0
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert len(records) == 2 * 2 * 2
    lavo = [r for r in records if r["cell"]["attention"] == "lavo"]
    assert all(r["cell"]["attention_args"] == {"r": 8, "w": 4} for r in lavo)
    for record in records:
        assert record["status"] == "ok" and record["kind"] == "efficiency"
        assert record["metrics"]["forward_ms"] > 0 and record["metrics"]["forward_backward_ms"] > 0
        assert record["metrics"]["forward_backward_peak_mib"] > 0
        assert record["provenance"]["torch"] and "git" in record["provenance"]
    assert "eff. length" in capsys.readouterr().out


def test_efficiency_rejects_bad_names(capsys):
    assert main(["efficiency", "--attention", "lavoo", "--lengths", "8"]) == 2
    assert "unknown attention 'lavoo'; known:" in capsys.readouterr().err
    assert main(["efficiency", "--attention-args", "lavo:q=1", "--lengths", "8"]) == 2
    assert "unknown hyperparameter 'q'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["efficiency", "--lengths", "8,abc"])


def test_scaling_exponent_recovers_powers():
    lengths = [256, 1024, 4096]
    assert scaling_exponent(lengths, [3e-6 * n**2 for n in lengths]) == pytest.approx(2.0)
    assert scaling_exponent(lengths, [5e-3 * n for n in lengths]) == pytest.approx(1.0)
    assert scaling_exponent([256], [1.0]) is None


def test_efficiency_length_interpolates_in_log_space():
    # ratio 2 at 1000, 1/2 at 4000: log-ratio crosses zero halfway in log n, i.e. at 2000.
    assert efficiency_length([1000, 4000], [2.0, 1.0], [1.0, 2.0]) == pytest.approx(2000)
    assert efficiency_length([1000, 4000], [0.5, 0.5], [1.0, 1.0]) == 1000
    assert efficiency_length([1000, 4000], [2.0, 2.0], [1.0, 1.0]) == math.inf
