"""Run the LM task for several attentions and print the comparison tables.

    python -m tasks.lm --attention softmax,lavo --attention-args lavo:r=16,w=16
    python -m tasks.lm --attention lavo --preset paper --device cuda --set max_update=20000

Each attention's run writes its checkpoint, logs and ``result.json`` under
``--workdir/<attention label>/``. The benchmark matrix (every task, seeds, records with
provenance) is the runner's job; this is the task on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from attention_zoo import AttentionConfigError, Pattern, list_attentions, parse_attention_args
from tasks.base import AttentionChoice, resolve_attention
from tasks.lm.task import LanguageModelingTask, extrapolation_table, streaming_table

PRESETS = Path(__file__).parent / "presets"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.lm", description=__doc__.split("\n")[0])
    parser.add_argument("--attention", default=",".join(list_attentions(Pattern.CAUSAL_SELF)),
                        help="comma-separated mechanisms (default: every causal one)")
    parser.add_argument("--attention-args", action="append", default=[], metavar="NAME:K=V,...",
                        help="hyperparameters of one mechanism, e.g. lavo:r=16,w=16")
    parser.add_argument("--preset", help=f"settings file: a name in {PRESETS} or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the task's Config, e.g. seq_len=256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--workdir", type=Path, default=Path("results/lm"))
    args = parser.parse_args(argv)
    try:
        overrides: dict[str, object] = {}
        if args.preset:
            path = Path(args.preset)
            path = path if path.suffix else PRESETS / f"{args.preset}.yaml"
            overrides.update(yaml.safe_load(path.read_text()) or {})
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise AttentionConfigError(f"--set takes KEY=VALUE, got {item!r}")
            overrides[key.strip()] = value.strip()
        config = LanguageModelingTask.make_config(overrides)
        hyperparameters = {}
        for item in args.attention_args:
            name, sep, text = item.partition(":")
            if not sep:
                raise AttentionConfigError(f"--attention-args takes NAME:K=V,..., got {item!r}")
            hyperparameters[name] = parse_attention_args(name, text)
        choices = [
            resolve_attention(LanguageModelingTask,
                              AttentionChoice(name, hyperparameters.get(name, {})))
            for name in filter(None, (n.strip() for n in args.attention.split(",")))
        ]
    except (AttentionConfigError, OSError) as error:
        print(f"tasks.lm: {error}", file=sys.stderr)
        return 2
    extrapolation, streaming = {}, {}
    for choice in choices:
        label = choice["self"].label()
        workdir = args.workdir / label
        result = LanguageModelingTask().run(config, choice, seed=args.seed, device=args.device,
                                            workdir=workdir)
        (workdir / "result.json").write_text(json.dumps(
            {"attention": label, "config": dataclasses.asdict(config), "seed": args.seed,
             "device": args.device, **dataclasses.asdict(result)}, indent=1, default=str))
        extrapolation[label] = result.extra["extrapolation"]
        streaming[label] = result.extra["streaming"]
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        print(f"{label}: {metrics}; train {result.train_seconds:.0f} s, "
              f"peak {result.peak_memory_mib:.0f} MiB", flush=True)
    print()
    print(extrapolation_table(extrapolation, config.seq_len))
    print(streaming_table(streaming))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
