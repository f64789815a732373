"""The summarization task on fairseq: data preparation, ROUGE, the zoo_transformer's three
attention slots, incremental decoding, pattern refusal, and train + decode at a tiny size for
softmax and LAVO (CPU, seeded)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fairseq")
pytest.importorskip("rouge_score")

import torch

from attention_zoo import AttentionConfigError, Pattern
from runners.execute import execute
from tasks.base import AttentionChoice
from tasks.registry import get_fetcher, get_task
from tasks.summarization import data as sum_data
from tasks.summarization import metrics as evaluate

pytestmark = pytest.mark.task

# WikiText-2 as shipped: every line starts and ends with a space.
WIKITEXT = "\n".join(f"{line} " for line in [
    ' = Alpha Beta =',
    '',
    ' Alpha Beta is a small town . It is old .',
    ' A second lead paragraph .',
    '',
    ' = = History = =',
    '',
    ' The town was founded in 1800 .',
    '',
    ' = = = Recent = = =',
    '',
    ' It grew .',
    '',
    ' = Gamma =',
    '',
    ' Gamma has no sections at all , so it is skipped .',
    '',
    ' = Delta =',
    '',
    ' Delta is short .',
    '',
    ' = = Geography = =',
    '',
    ' Delta lies by a river .',
])

TINY = {
    "vocab_size": 400, "max_source_tokens": 48, "max_target_tokens": 24, "batch_size": 8,
    "steps": 40, "warmup_steps": 5, "lr": 3e-3, "beam": 2, "min_len": 3, "max_len": 12,
    "eval_examples": 4,
    "fairseq_args": "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 "
                    "--decoder-embed-dim 32 --encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64",
}
ARGS = {"softmax": {}, "lavo": {"r": 8, "w": 8}}


@pytest.fixture(scope="module", params=["softmax", "lavo"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run per mechanism (all three roles): 40 updates of a 1 + 1 layer x 32 model on
    the shipped sample, 4 test examples decoded greedily and with beam 2."""
    name = request.param
    root = tmp_path_factory.mktemp(f"summarization-{name}")
    saved = os.environ.get("ATTNBENCH_CACHE")
    os.environ["ATTNBENCH_CACHE"] = str(root / "cache")
    try:
        task = get_task("summarization")
        config = task.make_config(TINY)
        result = execute(task, config, AttentionChoice(name, ARGS[name]), seed=0, device="cpu",
                         workdir=root / "run")
    finally:
        if saved is None:
            os.environ.pop("ATTNBENCH_CACHE")
        else:
            os.environ["ATTNBENCH_CACHE"] = saved
    return {"name": name, "result": result, "workdir": root / "run", "config": config}


def test_rouge_of_reference_against_itself_is_100() -> None:
    references = ["the cat sat on the mat .", "Homarus gammarus is a species of lobster ."]
    assert evaluate.rouge(references, references) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})


def test_rouge_leaves_absl_holding_the_process_stderr(tmp_path: Path) -> None:
    # absl (imported by rouge-score) closes the stream its handler holds when logging's handlers
    # are reset (logging.config.dictConfig, as submitit does); holding a test's captured stderr,
    # it closed pytest's capture file and broke every later test.
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler().python_handler
    captured = (tmp_path / "captured").open("w")  # sys.stderr as the importing test saw it
    handler.stream = captured
    evaluate.rouge(["the cat sat"], ["the cat sat"])
    try:
        handler.close()  # what logging.config.dictConfig does to every existing handler
        assert not captured.closed
    finally:
        captured.close()


def test_rouge_against_hand_computed_values() -> None:
    # ROUGE-1: precision 2/2, recall 2/6 -> F1 = 0.5; ROUGE-2: 1 of 1 bigram, of 5 -> F1 = 1/3.
    scores = evaluate.rouge(["the cat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(50.0)
    assert scores["rouge2"] == pytest.approx(100 / 3)
    assert evaluate.rouge(["dog barks"], ["the cat sat"]) == pytest.approx(
        {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})
    with pytest.raises(ValueError, match="as many hypotheses"):
        evaluate.rouge(["a"], ["a", "b"])


def test_wikitext_articles_split_lead_and_sections() -> None:
    articles = sum_data.wikitext_articles(WIKITEXT)
    assert [a.title for a in articles] == ["Alpha Beta", "Gamma", "Delta"]
    assert articles[0].lead == ["Alpha Beta is a small town . It is old .", "A second lead paragraph ."]
    assert articles[0].sections == ["The town was founded in 1800 .", "It grew ."]
    assert articles[1].sections == []


def test_wikitext_examples_are_sections_to_first_lead_paragraph() -> None:
    examples = sum_data.wikitext_examples(WIKITEXT, min_summary_words=3)
    assert examples == [
        sum_data.Example("The town was founded in 1800 . It grew .",
                         "Alpha Beta is a small town . It is old ."),
        sum_data.Example("Delta lies by a river .", "Delta is short ."),
    ]
    # a lead under the minimum length is skipped
    assert [e.summary for e in sum_data.wikitext_examples(WIKITEXT, min_summary_words=5)] == [
        "Alpha Beta is a small town . It is old ."]


def test_shipped_sample_is_wikipedia_lead_generation() -> None:
    splits = {split: sum_data.read_split(sum_data.SAMPLE_DIR, split) for split in sum_data.SPLITS}
    assert {split: len(rows) for split, rows in splits.items()} == {"train": 105, "valid": 8, "test": 8}
    for rows in splits.values():
        for example in rows:
            assert len(example.source.split()) > len(example.summary.split()) / 2 > 4


def test_multi_news_src_tgt_layout(tmp_path: Path) -> None:
    (tmp_path / "test.src").write_text(
        "First story .NEWLINE_CHAR More of it . story_separator_special_tag Second story .\n"
        "Only one story .\n")
    (tmp_path / "test.tgt").write_text("– A summary .\n– Another one .\n")
    assert sum_data.read_split(tmp_path, "test") == [
        sum_data.Example("First story . More of it . ||||| Second story .", "A summary ."),
        sum_data.Example("Only one story .", "Another one ."),
    ]
    (tmp_path / "test.tgt").write_text("– A summary .\n")
    with pytest.raises(ValueError, match="has 2 lines but"):
        sum_data.read_split(tmp_path, "test")


def test_multi_news_hugging_face_layout(tmp_path: Path) -> None:
    rows = [{"document": "Story one.\n\n|||||Story two, here.", "summary": "– Both stories."}]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sum_data.read_split(tmp_path, "valid") == [
        sum_data.Example("Story one. ||||| Story two, here.", "Both stories.")]
    assert sum_data.tokenize("Story one. ||||| Two, <unk>!") == [
        "Story", "one", ".", "|||||", "Two", ",", "<unk>", "!"]
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="expected fields 'document' and 'summary'"):
        sum_data.read_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"train\.src \+ train\.tgt"):
        sum_data.read_split(tmp_path, "train")


def test_multi_news_fetch_is_a_dataset_entry_point() -> None:
    assert get_fetcher("multi_news") is sum_data.fetch_multi_news


def test_the_model_refuses_a_pattern_the_mechanism_lacks(tmp_path: Path) -> None:
    """Straight through fairseq's own argument parsing (fairseq-train's path): the model is
    never built, and the message names the mechanisms that have the pattern."""
    from fairseq import options

    from tasks.backends.fairseq_plugin import USER_DIR
    from tasks.backends.fairseq_plugin.transformer import ZooTransformerModel

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[
        str(tmp_path), "--user-dir", USER_DIR, "--task", "translation",
        "--arch", "zoo_transformer_tiny", "--cross-attention", "local",
    ])
    with pytest.raises(AttentionConfigError, match=r"'local' does not support causal_cross.*lavo"):
        ZooTransformerModel.build_model(args, task=None)


def test_a_decoder_without_incremental_decoding_recomputes_its_prefix() -> None:
    """probsparse declares no decoding state: the decoder recomputes its causal pass over the
    tokens so far at each step, which equals the teacher-forced pass of those tokens."""
    from tasks.backends.fairseq_plugin import ZooAttention

    torch.manual_seed(0)
    attention = ZooAttention(32, 4, "probsparse", pattern=Pattern.CAUSAL_SELF,
                             recompute_decoding=True).eval()
    x = torch.randn(7, 2, 32)  # [T, B, C]
    state: dict[str, Any] = {}
    with torch.no_grad():
        steps = [attention(x[t : t + 1], incremental_state=state)[0] for t in range(7)]
        expected = [attention(x[: t + 1])[0][-1:] for t in range(7)]
    torch.testing.assert_close(torch.cat(steps), torch.cat(expected))
    with pytest.raises(NotImplementedError, match="'probsparse' does not declare incremental"):
        ZooAttention(32, 4, "probsparse", pattern=Pattern.CAUSAL_SELF)(x[:1], incremental_state={})


@pytest.mark.slow
def test_train_and_decode(run: dict[str, Any]) -> None:
    result = run["result"]
    curve = result.extra["train_curve"]
    assert curve[-1][1] < curve[0][1] - 1.0, curve
    for label in ("greedy", "beam"):
        hypotheses = (run["workdir"] / f"hypotheses.{label}.txt").read_text().splitlines()
        assert len(hypotheses) == run["config"].eval_examples
        for hypothesis in hypotheses:
            # non-empty, within the length limits (fairseq's min_len / max_len_b)
            assert run["config"].min_len <= len(hypothesis.split()) <= run["config"].max_len
    for key in ("rouge1", "rouge2", "rougeL", "greedy_rouge1", "decode_tokens_per_second",
                "greedy_decode_tokens_per_second"):
        assert math.isfinite(result.metrics[key]), key
    assert result.metrics["source_tokens"] == pytest.approx(48.0)
    assert result.metrics["source_tokens_full"] > 48.0
    assert result.peak_memory_mib > 0
    assert result.extra["rouge_package"] == "rouge-score (Google)"


@pytest.mark.slow
def test_reported_rouge_is_recomputed_from_the_hypotheses(run: dict[str, Any]) -> None:
    result = run["result"]
    references = Path(result.extra["data"]["data_bin"]).parent.joinpath("test.references")
    references_text = references.read_text().splitlines()
    hypotheses = (run["workdir"] / "hypotheses.beam.txt").read_text().splitlines()
    expected = evaluate.rouge(hypotheses, references_text[: len(hypotheses)])
    assert result.metrics["rouge1"] == pytest.approx(expected["rouge1"])
    assert result.metrics["rougeL"] == pytest.approx(expected["rougeL"])


def _model(run: dict[str, Any]) -> tuple[Any, Any]:
    result = run["result"]
    models, _, task = evaluate.load(Path(result.extra["checkpoint"]),
                                    Path(result.extra["data"]["data_bin"]), "cpu")
    return models[0], task


@pytest.mark.slow
def test_every_slot_holds_the_chosen_mechanism(run: dict[str, Any]) -> None:
    from tasks.backends.fairseq_plugin import ZooAttention

    model, _ = _model(run)
    slots = [(layer.self_attn, "noncausal_self") for layer in model.encoder.layers]
    for layer in model.decoder.layers:
        slots += [(layer.self_attn, "causal_self"), (layer.encoder_attn, "causal_cross")]
    for module, pattern in slots:
        assert isinstance(module, ZooAttention)
        assert module.spec.name == run["name"]
        assert module.pattern.value == pattern


@pytest.mark.slow
def test_incremental_decoding_matches_the_full_pass(run: dict[str, Any]) -> None:
    """Token by token through fairseq's incremental_state equals teacher forcing."""
    model, task = _model(run)
    model = model.double()  # the same algebra in two orders: float64 agrees on any processor
    torch.manual_seed(0)
    source = torch.randint(4, len(task.source_dictionary), (2, 20))  # [B, S]
    lengths = torch.tensor([20, 20])
    target = torch.randint(4, len(task.target_dictionary), (2, 9))  # [B, T]
    with torch.no_grad():
        encoder_out = model.encoder(source, src_lengths=lengths)
        full, _ = model.decoder(target, encoder_out=encoder_out)  # [B, T, V]
        state: dict[str, Any] = {}
        steps = [model.decoder(target[:, : t + 1], encoder_out=encoder_out, incremental_state=state)[0]
                 for t in range(target.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-9, rtol=1e-9)


@pytest.mark.slow
def test_lavo_cross_attention_reads_its_memory_of_the_source(run: dict[str, Any]) -> None:
    """LAVO's causal cross attention reads only its orthogonal memory, a mean over the valid
    source positions: the output ignores the source's order and its padding, but not its content."""
    if run["name"] != "lavo":
        pytest.skip("a LAVO property")
    model, _ = _model(run)
    cross = model.decoder.layers[0].encoder_attn
    assert cross.pattern is Pattern.CAUSAL_CROSS
    torch.manual_seed(0)
    query = torch.randn(5, 2, 32)  # [T, B, C]
    source = torch.randn(11, 2, 32)  # [S, B, C]
    with torch.no_grad():
        out, _ = cross(query, source, source, static_kv=True)  # [T, B, C]
    order = torch.randperm(11)
    padded = torch.cat([source, torch.randn(4, 2, 32)])  # [S + 4, B, C]
    mask = torch.zeros(2, 15, dtype=torch.bool)
    mask[:, 11:] = True
    changed = source.clone()
    changed[3] += 1.0
    shuffled = source[order]  # one tensor for key and value: LAVO reads the layer's source input
    with torch.no_grad():
        torch.testing.assert_close(cross(query, shuffled, shuffled, static_kv=True)[0], out)
        torch.testing.assert_close(
            cross(query, padded, padded, key_padding_mask=mask, static_kv=True)[0], out)
        assert not torch.allclose(cross(query, changed, changed, static_kv=True)[0], out, atol=1e-4)
