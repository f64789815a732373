"""The GPU validation suite's tests (``tox -e gpu``): collected everywhere, skipped without CUDA.

- LAVO's chunked pass, compiled path and Triton kernels against the plain PyTorch path on CUDA,
  forward and gradients, fp32 / bf16 / fp16, lengths that are multiples of neither the window
  (16), the kernels' chunk (32) nor the chunked pass's (256);
- every task's smoke settings on CUDA for a few steps, in-process tasks under bf16 autocast;
- the LM task's token-by-token stream of 131,072 tokens with LAVO: the decoding state's size
  stays constant.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attention_zoo import build_attention
from runners.gpu_suite import TASK_SMOKE, run_task_smoke

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (the GPU suite: tox -e gpu)"),
]

TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 4e-2, torch.float16: 5e-3}
STREAM_TOKENS = 131_072


def _backend_against_plain(backend: str, pattern: str, combine: str, dtype: torch.dtype,
                           length: int) -> None:
    torch.manual_seed(0)
    config = {"combine": combine, "memory": "kv"}
    plain = build_attention("lavo", pattern=pattern, heads=4, head_dim=64, backend="torch",
                            **config).cuda()
    fast = build_attention("lavo", pattern=pattern, heads=4, head_dim=64, backend=backend,
                           **config).cuda()
    fast.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.position_bias.normal_()
        fast.position_bias.copy_(plain.position_bias)
    q, k, v = (torch.randn(2, length, 4, 64, device="cuda") for _ in range(3))
    grad_out = torch.randn_like(q)
    results = {}
    for name, module, inputs_dtype in (("plain", plain.double(), torch.float64),
                                       ("fast", fast, dtype)):
        leaves = [x.to(inputs_dtype).requires_grad_() for x in (q, k, v)]
        out = module(*leaves, None)
        out.backward(grad_out.to(inputs_dtype))
        results[name] = [out, *(x.grad for x in leaves), module.position_bias.grad]
    for label, got, want in zip(["out", "dq", "dk", "dv", "dP"], results["fast"], results["plain"]):
        scale = want.abs().max().item() or 1.0
        error = (got.double() - want).abs().max().item() / scale
        assert error < TOLERANCE[dtype], f"{backend} {pattern} {combine} {dtype} {label}: {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1000, 4099])
@pytest.mark.parametrize("backend", ["chunked", "compile", "triton"])
def test_backend_equals_plain_path_causal(backend, length, dtype):
    _backend_against_plain(backend, "causal_self", "average", dtype, length)


@pytest.mark.parametrize("backend", ["compile", "triton"])
@pytest.mark.parametrize("combine", ["average", "joint"])
def test_backend_equals_plain_path_noncausal_and_joint(backend, combine):
    _backend_against_plain(backend, "noncausal_self", combine, torch.float32, 1000)
    _backend_against_plain(backend, "causal_self", combine, torch.bfloat16, 1000)


@pytest.mark.parametrize("task", sorted(TASK_SMOKE))
def test_task_smoke_on_cuda_in_bf16(task, tmp_path):
    from tasks.base import list_tasks

    if task not in list_tasks():
        pytest.skip(f"task {task} is not installed")
    metrics = run_task_smoke(task, device="cuda", dtype=torch.bfloat16, workdir=tmp_path)
    assert metrics and all(math.isfinite(value) for value in metrics.values()), metrics


def test_lm_stream_of_131072_tokens_keeps_lavos_state_constant(tmp_path):
    from tasks.lm import evaluate

    run_task_smoke("lm", device="cuda", dtype=None, workdir=tmp_path)
    data_bin = _data_bin()
    model = evaluate.load_model(tmp_path / "checkpoints" / "checkpoint_last.pt", data_bin, "cuda",
                                max_positions=STREAM_TOKENS)
    tokens, eos = evaluate.split_tokens(data_bin, "test")
    tokens = tokens.repeat(math.ceil(STREAM_TOKENS / len(tokens)))[:STREAM_TOKENS]
    result = evaluate.stream(model, tokens, bos=eos, context=256)
    assert result.tokens == STREAM_TOKENS
    sizes = {bucket["state_bytes"] for bucket in result.buckets}
    assert len(sizes) == 1, result.buckets
    print(f"stream of {STREAM_TOKENS} tokens: {result.tokens_per_second:.0f} tokens/s, "
          f"state {sizes.pop()} bytes, peak {result.peak_memory_mib:.0f} MiB")


def _data_bin() -> Path:
    """The fairseq data folder of the LM smoke run (the shipped sample, prepared and cached)."""
    from tasks.lm import data as lm_data
    from tasks.lm.task import LanguageModelingTask

    config = LanguageModelingTask.make_config(TASK_SMOKE["lm"])
    prepared = lm_data.prepare(lm_data.SAMPLE_DIR, tokenizer=config.tokenizer,
                               vocab_size=config.vocab_size, cache=lm_data.cache_root())
    return prepared.data_bin
