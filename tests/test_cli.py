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


def test_tasks_lists_roles_metrics_and_fitting_mechanisms(capsys):
    from tasks.registry import fitting_attentions, get_task, list_tasks

    assert main(["tasks", "--format", "json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == list_tasks()
    for name, row in rows.items():
        task = get_task(name)
        assert {role: spec["pattern"] for role, spec in row["roles"].items()} == {
            role: pattern.value for role, pattern in task.roles.items()}
        for role, spec in row["roles"].items():
            assert spec["attentions"] == fitting_attentions(task, role) and "softmax" in spec["attentions"]
        assert [m["name"] for m in row["metrics"]] == [m.name for m in task.metrics]
        assert {"smoke", "paper", "tiny"} <= set(row["presets"])
    assert rows["lm"]["roles"]["self"]["pattern"] == "causal_self"
    assert {"name": "perplexity", "better": "lower"}.items() <= rows["lm"]["metrics"][0].items()
    assert main(["tasks"]) == 0 and "tts_transformer" in capsys.readouterr().out
    assert main(["tasks", "lmm"]) == 2
    assert "unknown task 'lmm'; known: lm," in capsys.readouterr().err


def test_listing_tasks_and_reporting_import_no_backbone(tmp_path):
    """The specs, `attnbench tasks` and `attnbench report` read no backbone: neither fairseq nor
    ESPnet is imported (a fresh interpreter, so that other tests' imports do not count)."""
    import subprocess
    import sys

    record = {"schema": "attnbench.run/1", "kind": "run", "key": "lm/softmax-seed0-0", "status": "ok",
              "cell": {"task": "lm", "attention": "softmax", "attention_args": {}, "overrides": {},
                       "settings": {}, "seed": 0},
              "seed": 0, "metrics": {"perplexity": 20.0, "bits_per_byte": 2.0},
              "parameters": 100, "attention_parameters": 0, "extra": {}}
    (tmp_path / "runs" / "lm").mkdir(parents=True)
    (tmp_path / "runs" / "lm" / "softmax-seed0-0.json").write_text(json.dumps(record))
    script = ("import sys\nfrom runners.cli import main\n"
              f"assert main(['tasks']) == 0 and main(['report', {str(tmp_path)!r}]) == 0\n"
              "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'fairseq', 'espnet', 'espnet2'})\n"
              "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_data_lists_fetchers_and_preparation_tools(capsys):
    assert main(["data", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("pg19", "ljspeech", "ett", "pcn", "multi_news", "ljspeech_durations", "pcn_generate"):
        assert name in listed
    assert main(["data", "prepare", "aligner"]) == 2
    assert "unknown data tool 'aligner'; known: ljspeech_durations, pcn_generate" in capsys.readouterr().err
