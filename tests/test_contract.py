"""Every registered mechanism (and LAVO's option variants) against the zoo contract.

Parametrised over the registry: a newly registered mechanism is tested with no new test code.
"""

from __future__ import annotations

import pytest

from attention_zoo import attention_spec, list_attentions
from attention_zoo.testing import CHECKS

pytestmark = pytest.mark.zoo

VARIANTS = [(name, {}) for name in list_attentions()] + [
    ("lavo", {"combine": "joint"}),
    ("lavo", {"bases": "learned"}),
    ("lavo", {"position": "none", "w": 5, "r": 3}),
    ("lavo", {"w": 1}),
    ("lavo", {"w": 64}),  # one window longer than every test sequence
    ("lavo", {"memory": "kv"}),
    ("lavo", {"memory": "kv", "combine": "joint", "bases": "learned"}),
    # Chunked forms with several chunks inside the test sequences (the defaults cover one).
    ("based", {"window": 4, "feature_dim": 3}),
    ("deltanet", {"chunk_size": 4}),
    ("gated_deltanet", {"chunk_size": 6}),
    ("gla", {"chunk_size": 4, "gate_rank": 2}),
    ("hgrn2", {"chunk_size": 3, "lower_bound": 0.5}),
    ("local", {"window": 3}),
    ("local", {"window": 4, "kind": "blocked"}),
    ("longshort", {"window": 4, "rank": 3, "segment": 3, "segment_rank": 2}),
    ("nystrom", {"landmarks": 4}),
    ("mamba2", {"chunk_size": 5}),
    ("probsparse", {"factor": 1}),  # few active queries: most of each sequence is lazy
    ("retnet", {"chunk_size": 5}),
]


def _cases():
    for name, config in VARIANTS:
        for pattern in sorted(attention_spec(name).patterns):
            for check in CHECKS:
                label = ",".join(f"{k}={v}" for k, v in config.items())
                yield pytest.param(name, config, pattern, check,
                                   id=f"{name}[{label}]-{pattern}-{check}")


@pytest.mark.parametrize(("name", "config", "pattern", "check"), list(_cases()))
def test_contract(name, config, pattern, check):
    CHECKS[check](name, pattern, **config)


def test_every_mechanism_is_covered():
    covered = {name for name, _ in VARIANTS}
    assert covered == set(list_attentions())
