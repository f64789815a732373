"""The LM task on fairseq: training, eval-lm perplexity, bits per byte, the zoo adapter,
causality, incremental decoding and configuration errors (CPU, seeded, a tiny model)."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fairseq")
pytest.importorskip("tokenizers")

import torch
import torch.nn.functional as F

from attention_zoo import (
    AttentionConfigError,
    MultiHeadAttention,
    Pattern,
    attention_spec,
    list_attentions,
)
from runners.execute import execute
from tasks.backends.fairseq_plugin import USER_DIR, ZooAttention, state_bytes
from tasks.base import AttentionChoice, resolve_attention
from tasks.lm import data as lm_data
from tasks.lm import metrics as evaluate
from tasks.lm.metrics import evaluation_length, extrapolation_multiples
from tasks.lm.model import load_model
from tasks.registry import get_fetcher, get_task

pytestmark = pytest.mark.task

CAUSAL = list_attentions(Pattern.CAUSAL_SELF)
DECODING = [name for name in CAUSAL if attention_spec(name).decoding]
SMALL_ARGS = {"lavo": {"r": 4, "w": 4}}


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run of the task: a small PG-19-layout folder cut from the shipped sample,
    a 1-layer LAVO model trained 30 updates at L=32, evaluated at L and 2L, streamed."""
    root = tmp_path_factory.mktemp("lm")
    data = root / "pg19"
    for split, limit in (("train", 20_000), ("validation", 6_000), ("test", 6_000)):
        (data / split).mkdir(parents=True)
        for book in lm_data.split_files(lm_data.SAMPLE_DIR, split):
            text = book.read_bytes()[:limit]
            (data / split / book.name).write_bytes(text[: text.rfind(b"\n") + 1])
    saved = os.environ.get("ATTNBENCH_CACHE")
    os.environ["ATTNBENCH_CACHE"] = str(root / "cache")
    try:
        task = get_task("lm")
        config = task.make_config({
            "data": str(data), "vocab_size": 300, "seq_len": 32, "batch_size": 4,
            "steps": 30, "warmup_steps": 5, "lr": 3e-3, "extrapolation": "2",
            "stream_tokens": 80, "fairseq_args": "--decoder-layers 1 --decoder-embed-dim 64",
        })
        threads = torch.get_num_threads()
        result = execute(task, config, AttentionChoice("lavo", {"r": 8, "w": 8}), seed=0, device="cpu",
                         workdir=root / "run")
        assert torch.get_num_threads() == threads  # the run's own thread setting is undone
        prepared = lm_data.prepare(data, tokenizer="bytelevel", vocab_size=300,
                                   cache=lm_data.cache_root())
    finally:
        if saved is None:
            os.environ.pop("ATTNBENCH_CACHE")
        else:
            os.environ["ATTNBENCH_CACHE"] = saved
    return {"result": result, "prepared": prepared, "data": data, "config": config,
            "checkpoint": Path(result.extra["checkpoint"])}


def build_model(data_bin: Path, attention: str, attention_args: str = "", *extra: str) -> Any:
    """A freshly initialised zoo_transformer_lm, through fairseq's own argument parsing."""
    from fairseq import options
    from fairseq import tasks as fairseq_tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[
        str(data_bin), "--user-dir", USER_DIR, "--task", "language_modeling",
        "--arch", "zoo_transformer_lm_tiny", "--attention", attention,
        "--attention-args", attention_args, "--decoder-layers", "2", "--decoder-embed-dim",
        "32", "--decoder-attention-heads", "4", "--tokens-per-sample", "64", *extra,
    ])
    return fairseq_tasks.setup_task(args).build_model(args).eval()


def args_text(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in SMALL_ARGS.get(name, {}).items())


@pytest.mark.slow
def test_training_loss_falls(lm_run: dict[str, Any]) -> None:
    curve = lm_run["result"].extra["train_curve"]
    assert len(curve) >= 10
    first, last = curve[0][1], curve[-1][1]
    assert math.isfinite(last) and last < first - 1.0, curve


@pytest.mark.slow
def test_eval_perplexity_equals_exp_mean_nll(lm_run: dict[str, Any]) -> None:
    """fairseq-eval-lm's perplexity, recomputed here from the model's logits: the test stream
    in blocks of L (input shifted right by one, starting from </s>), every token scored once."""
    prepared, config = lm_run["prepared"], lm_run["config"]
    model = load_model(lm_run["checkpoint"], prepared.data_bin, "cpu")
    tokens, eos = evaluate.split_tokens(prepared.data_bin, "test")
    inputs = torch.cat([torch.tensor([eos]), tokens[:-1]])
    for row in lm_run["result"].extra["extrapolation"]:
        length = row["context"]
        full = len(tokens) // length * length
        total = 0.0
        with torch.no_grad():
            # the whole blocks as one batch, then the last, shorter block
            for block_inputs, block_targets in (
                (inputs[:full].view(-1, length), tokens[:full].view(-1, length)),
                (inputs[None, full:], tokens[None, full:]),
            ):
                if block_targets.numel():
                    logits, _ = model(block_inputs)  # [N, T, V]
                    total += F.cross_entropy(logits.flatten(0, 1).double(),
                                             block_targets.flatten(), reduction="sum").item()
        expected = math.exp(total / len(tokens))
        assert math.isfinite(row["perplexity"])
        assert row["perplexity"] == pytest.approx(expected, rel=1e-4)
        assert row["context"] == config.seq_len * row["multiple"]
    assert lm_run["result"].metrics["perplexity"] == lm_run["result"].extra["extrapolation"][0][
        "perplexity"]


@pytest.mark.slow
def test_bits_per_byte_is_total_bits_over_utf8_bytes(lm_run: dict[str, Any]) -> None:
    prepared = lm_run["prepared"]
    raw = b"".join(p.read_bytes() for p in sorted((lm_run["data"] / "test").glob("*.txt")))
    text = raw.decode("utf-8").replace("\ufeff", "").replace("\r\n", "\n")
    text += "" if text.endswith("\n") else "\n"
    assert prepared.bytes["test"] == len(text.encode("utf-8"))
    tokens, _ = evaluate.split_tokens(prepared.data_bin, "test")
    assert prepared.tokens["test"] == len(tokens)
    # The binarised tokens are that very text: decoding them line by line gives it back.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(prepared.tokenizer))
    dictionary_offset = 4  # fairseq's <s> <pad> </s> <unk> come first in dict.txt's order
    lines, current = [], []
    for token in tokens.tolist():
        if token == 2:
            lines.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token - dictionary_offset)
    assert "\n".join(lines) + "\n" == text
    row = lm_run["result"].extra["extrapolation"][0]
    total_bits = math.log2(row["perplexity"]) * len(tokens)
    assert row["bits_per_byte"] == pytest.approx(total_bits / len(text.encode("utf-8")), rel=1e-5)
    assert lm_run["result"].metrics["bits_per_byte"] == row["bits_per_byte"]


@pytest.mark.slow
def test_task_result_reports_speed_memory_and_tables(lm_run: dict[str, Any]) -> None:
    result = lm_run["result"]
    assert result.metrics["train_tokens_per_second"] > 0
    assert result.peak_memory_mib and result.peak_memory_mib > 0
    assert result.parameters > result.attention_parameters > 0
    assert "| `lavo(r=8,w=8)` |" in result.extra["tables"]["extrapolation"]
    assert "2L = 64" in result.extra["tables"]["extrapolation"]
    buckets = result.extra["streaming"]["buckets"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 32), (32, 64), (64, 80)]


@pytest.mark.slow
def test_streaming_equals_the_parallel_pass(lm_run: dict[str, Any]) -> None:
    """Token-by-token perplexity through incremental_state equals one parallel pass over the
    same tokens; LAVO's state stays the same size as the stream grows."""
    prepared = lm_run["prepared"]
    model = load_model(lm_run["checkpoint"], prepared.data_bin, "cpu")
    tokens, eos = evaluate.split_tokens(prepared.data_bin, "test")
    tokens = tokens[:48]
    streamed = evaluate.stream(model, tokens, bos=eos, context=16)
    with torch.no_grad():
        logits, _ = model(torch.cat([torch.tensor([eos]), tokens[:-1]])[None])
    nll = F.cross_entropy(logits[0].double(), tokens, reduction="none")
    for bucket in streamed.buckets:
        expected = math.exp(nll[bucket["start"] : bucket["end"]].mean().item())
        assert bucket["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert streamed.buckets[0]["state_bytes"] == streamed.buckets[-1]["state_bytes"] > 0


ADAPTER_CASES = [(name, pattern) for pattern in (Pattern.CAUSAL_SELF, Pattern.NONCAUSAL_SELF,
                                                  Pattern.NONCAUSAL_CROSS, Pattern.CAUSAL_CROSS)
                 for name in list_attentions(pattern)]


@pytest.mark.parametrize(("name", "pattern"), ADAPTER_CASES)
def test_adapter_equals_zoo_layer(name: str, pattern: Pattern) -> None:
    """Same weights, same input: the fairseq adapter (time-major) equals the zoo layer, for the
    patterns fairseq models use (decoder and encoder self attention, encoder-decoder attention;
    the summarization task shares this plug-in)."""
    source_dim = 24 if pattern.cross else None
    adapter = ZooAttention(32, 4, name, SMALL_ARGS.get(name), pattern=pattern,
                           kdim=source_dim, vdim=source_dim)
    layer = MultiHeadAttention(32, 4, name, pattern=pattern, attention_args=SMALL_ARGS.get(name),
                               kdim=source_dim, vdim=source_dim)
    layer.load_state_dict(adapter.layer.state_dict())
    adapter.eval(), layer.eval()  # randomized mechanisms (ra, lara) sample only in training
    x = torch.randn(3, 10, 32)  # [B, T, C]
    source = torch.randn(3, 13, 24) if pattern.cross else x  # [B, S, kdim]
    padding = torch.zeros(3, source.shape[1], dtype=torch.bool)
    padding[1, 7:] = True
    out, weights = adapter(x.transpose(0, 1), source.transpose(0, 1), source.transpose(0, 1),
                           key_padding_mask=padding)
    assert weights is None
    expected = layer(x, source, source, padding) if pattern.cross else layer(
        x, key_padding_mask=padding)
    torch.testing.assert_close(out.transpose(0, 1), expected)
    if pattern == Pattern.CAUSAL_CROSS:
        # Encoder-decoder attention during generation: one new query, static keys and values.
        step, _ = adapter(x[:, 4:5].transpose(0, 1), source.transpose(0, 1),
                          source.transpose(0, 1), key_padding_mask=padding,
                          incremental_state={}, static_kv=True)
        torch.testing.assert_close(step.transpose(0, 1), expected[:, 4:5])
    elif pattern == Pattern.NONCAUSAL_CROSS:
        with pytest.raises(NotImplementedError, match="needs the causal_cross pattern"):
            adapter(x[:, 4:5].transpose(0, 1), source.transpose(0, 1), source.transpose(0, 1),
                    incremental_state={}, static_kv=True)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.slow
def test_model_does_not_leak_the_future(lm_run: dict[str, Any], name: str) -> None:
    # float64: the two passes are the same algebra, so they agree to rounding on any processor
    model = build_model(lm_run["prepared"].data_bin, name, args_text(name)).double()
    assert all(isinstance(layer.self_attn, ZooAttention) for layer in model.decoder.layers)
    tokens = torch.randint(4, 300, (2, 24))
    changed = tokens.clone()
    changed[:, 15:] = torch.randint(4, 300, (2, 9))
    with torch.no_grad():
        before, _ = model(tokens)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :15], after[:, :15], rtol=0, atol=1e-9)
    assert not torch.allclose(before[:, 15:], after[:, 15:])


@pytest.mark.parametrize("name", DECODING)
@pytest.mark.slow
def test_incremental_decoding_equals_parallel_pass(lm_run: dict[str, Any], name: str) -> None:
    """fairseq's incremental_state (as SequenceGenerator drives it), including a beam-search
    reorder half way, gives the parallel pass's logits. In float64: the step and the parallel
    form are the same algebra summed in another order, so in float32 their difference depends
    on the processor's kernels (1.8e-5 on one Xeon for gla); in float64 it is rounding."""
    model = build_model(lm_run["prepared"].data_bin, name, args_text(name)).double()
    tokens = torch.randint(4, 300, (2, 20))
    order = torch.tensor([1, 0])
    reordered = torch.cat([tokens[order, :10], tokens[:, 10:]], dim=1)
    with torch.no_grad():
        expected, _ = model(reordered)  # [2, 20, V]
        state: dict[str, Any] = {}
        steps = []
        for t in range(20):
            if t == 10:
                model.decoder.reorder_incremental_state_scripting(state, order)
            prefix = (tokens if t < 10 else reordered)[:, : t + 1]
            logits, _ = model.decoder(prefix, incremental_state=state)
            steps.append(logits[:, -1])
    got = torch.stack(steps, dim=1)
    torch.testing.assert_close(got[:, 10:], expected[:, 10:], atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        before_reorder, _ = model(tokens)
    torch.testing.assert_close(got[:, :10], before_reorder[:, :10], atol=1e-9, rtol=1e-9)
    assert all(state_bytes(layer.self_attn.decoding_state(state)) > 0
               for layer in model.decoder.layers)


@pytest.mark.slow
def test_bad_attention_gives_clear_errors(lm_run: dict[str, Any]) -> None:
    data_bin = lm_run["prepared"].data_bin
    with pytest.raises(AttentionConfigError, match=r"unknown attention 'lavoo'; known: .*lavo"):
        build_model(data_bin, "lavoo")
    with pytest.raises(AttentionConfigError, match=r"unknown hyperparameter 'q'; valid: r, w"):
        build_model(data_bin, "lavo", "q=1")
    with pytest.raises(AttentionConfigError, match=r"cannot read 'x' as 'r'"):
        build_model(data_bin, "lavo", "r=x")
    with pytest.raises(AttentionConfigError, match=r"--attention-dropout 0.1 is not supported"):
        build_model(data_bin, "softmax", "", "--attention-dropout", "0.1")
    task = get_task("lm")
    with pytest.raises(AttentionConfigError, match=r"roles are self"):
        resolve_attention(task, {"cross": AttentionChoice("lavo")})
    with pytest.raises(AttentionConfigError, match=r"'tokenizer'"):
        task.make_config({"tokenizer": "wordpiece"})
    with pytest.raises(ValueError, match=r"got '2,x'"):
        extrapolation_multiples("2,x")
    assert extrapolation_multiples("2,1.5,4.0") == [1, 1.5, 2, 4]
    with pytest.raises(ValueError, match=r"got '0,2'"):
        extrapolation_multiples("0,2")
    with pytest.raises(ValueError, match=r"1.5 x seq_len 33 = 49.5 is not a whole number"):
        evaluation_length(1.5, 33)


def test_compat_patches_stay_local() -> None:
    """numpy's removed aliases are back for fairseq; only fairseq's checkpoint loader skips
    weights_only, torch.load elsewhere is untouched."""
    from fairseq import checkpoint_utils

    assert np.int is int and np.float is float and np.compat.long is int
    assert checkpoint_utils.torch.load is not torch.load
    assert torch.load.__module__ == "torch.serialization"
    # A torchaudio whose native library cannot load reads as absent (ImportError, which
    # fairseq's guards catch), never as the OSError its import raises otherwise.
    with contextlib.suppress(ImportError):
        import torchaudio  # noqa: F401


def test_fetch_pg19_follows_the_bucket_listing_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``attnbench data fetch pg19`` (offline here: the bucket's JSON listing API is faked)."""
    import io
    import json

    pages = {
        ("train/", ""): {"items": [{"name": "train/1.txt"}, {"name": "train/2.txt"}],
                         "nextPageToken": "next"},
        ("train/", "next"): {"items": [{"name": "train/3.txt"}]},
        ("validation/", ""): {"items": [{"name": "validation/4.txt"}]},
        ("test/", ""): {"items": [{"name": "test/5.txt"}, {"name": "test/"}]},
    }
    downloads: list[str] = []

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        if url.startswith(lm_data.PG19_LISTING):
            query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
            return io.BytesIO(json.dumps(pages[query["prefix"], query.get("pageToken", "")])
                              .encode())
        name = url.removeprefix(lm_data.PG19_URL + "/")
        downloads.append(name)
        return io.BytesIO(f"book {name}\n".encode())

    monkeypatch.setattr(lm_data.urllib.request, "urlopen", urlopen)
    fetch = get_fetcher("pg19")  # the entry point behind `attnbench data fetch pg19`
    assert fetch(tmp_path) == tmp_path
    assert sorted(downloads) == ["test/5.txt", "train/1.txt", "train/2.txt", "train/3.txt",
                                 "validation/4.txt"]
    assert (tmp_path / "train" / "3.txt").read_text() == "book train/3.txt\n"
    assert [p.name for p in lm_data.split_files(tmp_path, "train")] == ["1.txt", "2.txt", "3.txt"]
    downloads.clear()
    fetch(tmp_path)
    assert downloads == []  # everything already there: nothing downloaded again



def test_fairseq_cli_modules_leave_the_root_logger_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # fairseq_cli.preprocess calls logging.basicConfig(stream=sys.stdout) on import, which would
    # leave a root handler on the stdout of that moment for the rest of the process.
    import logging
    import sys

    from tasks.backends.fairseq_plugin.compat import import_fairseq_cli

    monkeypatch.delitem(sys.modules, "fairseq_cli.preprocess", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a worker (pytest's own would stop basicConfig)
    level = root.level
    module = import_fairseq_cli("preprocess")
    assert callable(module.main)
    assert root.handlers == [] and root.level == level
