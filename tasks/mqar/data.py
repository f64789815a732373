"""Multi-query associative recall (MQAR) sequences, distributed as Zoology generates them.

Zoology (Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models",
2023) defines the task; this is an independent implementation of the same distribution:

- The vocabulary ``[0, V)`` is split in two disjoint halves: keys are drawn from
  ``[1, V // 2)`` (token 0 is the filler, never a key) and values from ``[V // 2, V)``.
- An example starts with ``n`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys, distinct
  values, each drawn uniformly without replacement).
- The rest of the sequence (``L - 2n`` tokens) holds one query of every key, in slots of two
  tokens: the query of a key sits at the first token of a slot, and the slots are drawn without
  replacement with probability proportional to ``a * i ** (a - 1)`` for slot ``i = 1, 2, ...``
  (Zoology's ``power_a``; ``a = 1`` is uniform, small ``a`` crowds the queries near the pairs).
- Every other position is filler: token 0, or (Zoology's default) a token drawn uniformly from
  the whole vocabulary, which may repeat a key as a distractor.
- The target at a query's position is the value bound to the key (the next token a language
  model should predict there); every other position's target is :data:`IGNORE` and does not
  count in the loss or the accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attention_zoo import AttentionConfigError

IGNORE = -100
"""Target of a position that is not a query (cross-entropy's default ``ignore_index``)."""


@dataclass(frozen=True)
class RecallSlice:
    """One kind of example: sequence length and number of key-value pairs.

    Attributes:
        seq_len: tokens per example (L).
        kv_pairs: key-value pairs per example (n), each queried once.
    """

    seq_len: int
    kv_pairs: int

    def label(self) -> str:
        """``"L64-kv8"``: the name of this slice in metrics and records."""
        return f"L{self.seq_len}-kv{self.kv_pairs}"

    def check(self, vocab_size: int, owner: str = "mqar") -> None:
        """Refuse a slice that cannot be generated, naming the limit it breaks."""
        if self.kv_pairs < 1:
            raise AttentionConfigError(f"{owner}: kv_pairs={self.kv_pairs} must be at least 1")
        # Pairs take 2n tokens, and the n queries need n two-token slots after them.
        if 4 * self.kv_pairs > self.seq_len:
            raise AttentionConfigError(
                f"{owner}: {self.kv_pairs} key-value pairs do not fit in seq_len={self.seq_len}: "
                f"the pairs and their queries need 4 * kv_pairs = {4 * self.kv_pairs} tokens, so "
                f"seq_len={self.seq_len} holds at most {self.seq_len // 4} pairs")
        keys, values = key_vocabulary(vocab_size), value_vocabulary(vocab_size)
        if self.kv_pairs > min(len(keys), len(values)):
            raise AttentionConfigError(
                f"{owner}: vocab_size={vocab_size} is too small for {self.kv_pairs} distinct keys "
                f"and values from disjoint vocabularies: it has {len(keys)} key tokens "
                f"[1, {vocab_size // 2}) and {len(values)} value tokens [{vocab_size // 2}, "
                f"{vocab_size}); vocab_size must be at least {2 * self.kv_pairs + 2}")


def key_vocabulary(vocab_size: int) -> np.ndarray:
    """Tokens keys are drawn from: ``[1, V // 2)``."""
    return np.arange(1, vocab_size // 2)


def value_vocabulary(vocab_size: int) -> np.ndarray:
    """Tokens values are drawn from: ``[V // 2, V)``."""
    return np.arange(vocab_size // 2, vocab_size)


def parse_slices(text: str, owner: str = "mqar") -> tuple[RecallSlice, ...]:
    """Slices from ``"128:8,256:16"`` (``seq_len:kv_pairs`` separated by commas; empty: none)."""
    slices = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        length, _, pairs = item.partition(":")
        try:
            slices.append(RecallSlice(int(length), int(pairs)))
        except ValueError:
            raise AttentionConfigError(
                f"{owner}: cannot read slice {item!r}; write seq_len:kv_pairs, e.g. '128:8,256:16'"
            ) from None
    return tuple(slices)


def query_slot_weights(slots: int, power_a: float) -> np.ndarray:
    """Zoology's power law over the query slots: ``p_i ∝ a * i ** (a - 1)``, ``i = 1..slots``."""
    weights = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    return weights / weights.sum()


@dataclass(frozen=True)
class RecallExamples:
    """A batch of generated examples of one slice.

    Attributes:
        inputs: token ids [N, L] (int64).
        targets: the value at each query position, :data:`IGNORE` elsewhere [N, L] (int64).
        slice: the slice they were drawn from.
    """

    inputs: Tensor
    targets: Tensor
    slice: RecallSlice

    def __len__(self) -> int:
        return self.inputs.shape[0]


def generate(recall_slice: RecallSlice, *, examples: int, vocab_size: int, seed: int,
             power_a: float = 0.01, random_filler: bool = True) -> RecallExamples:
    """``examples`` MQAR sequences of ``recall_slice``, reproducible from ``seed`` alone.

    Args:
        recall_slice: sequence length L and pairs n (checked against ``vocab_size``).
        examples: N.
        vocab_size: V; keys from ``[1, V // 2)``, values from ``[V // 2, V)``.
        seed: the generator's seed (a numpy ``Generator``; the global RNGs are left alone).
        power_a: Zoology's ``power_a`` for the query placement (> 0).
        random_filler: non-query positions after the pairs hold random tokens from the whole
            vocabulary (Zoology's ``random_non_queries``) rather than token 0.

    Returns:
        :class:`RecallExamples` with inputs and targets of shape [N, L].
    """
    recall_slice.check(vocab_size)
    if power_a <= 0:
        raise AttentionConfigError(f"mqar: power_a={power_a} must be positive")
    length, pairs = recall_slice.seq_len, recall_slice.kv_pairs
    rng = np.random.default_rng(seed)
    keys = _distinct_rows(rng, key_vocabulary(vocab_size), examples, pairs)  # [N, n]
    values = _distinct_rows(rng, value_vocabulary(vocab_size), examples, pairs)  # [N, n]
    context = 2 * pairs
    slots = (length - context) // 2
    chosen = _successive_sample(rng, query_slot_weights(slots, power_a), examples, pairs)
    query_positions = context + 2 * chosen  # [N, n]: the i-th key is asked at query_positions[:, i]

    inputs = np.zeros((examples, length), dtype=np.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    if random_filler:
        inputs[:, context:] = rng.integers(0, vocab_size, size=(examples, length - context))
    targets = np.full((examples, length), IGNORE, dtype=np.int64)
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    np.put_along_axis(targets, query_positions, values, axis=1)
    return RecallExamples(torch.from_numpy(inputs), torch.from_numpy(targets), recall_slice)


def _distinct_rows(rng: np.random.Generator, population: np.ndarray, rows: int,
                   size: int) -> np.ndarray:
    """[rows, size] tokens, each row an ordered uniform draw from ``population`` without
    replacement (row by row: a vectorised draw would cost rows x population random numbers)."""
    return np.stack([rng.choice(population, size=size, replace=False) for _ in range(rows)])


def _successive_sample(rng: np.random.Generator, weights: np.ndarray, rows: int, size: int,
                       chunk: int = 2048) -> np.ndarray:
    """[rows, size] indices into ``weights``, each row drawn without replacement with
    probability proportional to ``weights`` at every draw (successive sampling, as
    ``numpy.random.choice(p=..., replace=False)``), by Efraimidis and Spirakis's exponential
    keys: the ``size`` smallest ``E_i / w_i``, ``E_i ~ Exp(1)``, in increasing order. Rows go
    in chunks to bound memory."""
    picked = []
    for start in range(0, rows, chunk):
        keys = rng.exponential(size=(min(chunk, rows - start), len(weights))) / weights  # [c, P]
        smallest = np.argpartition(keys, size - 1, axis=1)[:, :size]  # [c, size], unordered
        order = np.argsort(np.take_along_axis(keys, smallest, axis=1), axis=1)
        picked.append(np.take_along_axis(smallest, order, axis=1))
    return np.concatenate(picked) if picked else np.zeros((0, size), dtype=np.int64)
