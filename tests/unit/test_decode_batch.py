"""Batched greedy decoding gives each row exactly the tokens a one-at-a-time decode gives it (fp32), whatever
the mix of prompt lengths, positions, budgets, stop ids and repetition penalties."""

from __future__ import annotations

import copy

import pytest

from qzoom_service import decode
from qzoom_service.decode import DecodeBatch, decode_batch
from qzoom_service.tiny import build_tiny

from .decode_helpers import layer_length, make_item, reference, reference_decode, standard_rows


@pytest.fixture(scope="module")
def model():
    return build_tiny(seed=1)[0]


@pytest.fixture(scope="module")
def rows(model):
    return standard_rows(model)


def test_the_tiny_model_is_sensitive_to_what_the_test_varies(model, rows):
    """Guards the other tests: penalty, positions and prompts each change the greedy tokens."""
    plain = [reference(model, r, 12, 1.0, set()) for r in rows]
    assert len({tuple(p) for p in plain}) == len(rows)
    assert any(reference(model, r, 12, 1.3, set()) != p for r, p in zip(rows, plain))
    hidden, cache, position, ids = rows[1]
    assert reference(model, (hidden, cache, position + 5, ids), 12, 1.0, set()) != plain[1]


@pytest.mark.parametrize("check_every", [1, 3])
def test_mixed_rows_decode_together_as_they_decode_alone(model, rows, check_every):
    plain = [reference(model, r, 12, 1.0, set()) for r in rows]
    # Row 0 stops on its 3rd token's id, row 1 runs out of budget, rows 2 and 3 use repetition penalties.
    settings = [
        (12, 1.0, {plain[0][2]}),
        (7, 1.0, {-1}),
        (12, 1.3, set()),
        (9, 1.05, {plain[3][5]}),
    ]
    expected = [reference(model, r, *s) for r, s in zip(rows, settings)]
    assert len({len(e) for e in expected}) > 2, "the rows should finish at different steps"
    got = decode_batch(model, [make_item(r, *s) for r, s in zip(rows, settings)], check_every=check_every)
    assert got == expected


def test_one_penalty_for_all_rows_matches_too(model, rows):
    expected = [reference(model, r, 10, 1.2, set()) for r in rows]
    assert decode_batch(model, [make_item(r, 10, 1.2, set()) for r in rows]) == expected


def test_a_row_with_no_budget_gets_no_tokens_and_holds_no_one(model, rows):
    items = [make_item(rows[0], 0, 1.0, set()), make_item(rows[1], 6, 1.0, set())]
    assert decode_batch(model, items) == [[], reference(model, rows[1], 6, 1.0, set())]


def test_greedy_decode_keeps_its_signature_and_results(model, rows):
    hidden, cache, position, ids = rows[2]
    stop = decode.eos_ids(model)
    penalty = model.generation_config.repetition_penalty
    expected = reference_decode(model, hidden, copy.deepcopy(cache), position, ids, 10, penalty, stop)
    assert decode.greedy_decode(model, hidden, copy.deepcopy(cache), position, ids, 10) == expected


def test_finished_rows_leave_and_the_padding_they_needed_goes_with_them(model, rows):
    """The longest prompt stops first; the others then decode without its padding columns."""
    longest = max(range(len(rows)), key=lambda i: layer_length(rows[i][1]))
    first = reference(model, rows[longest], 1, 1.0, set())
    batch = DecodeBatch(model)
    items = [make_item(r, 1 if i == longest else 6, 1.0, set()) for i, r in enumerate(rows)]
    batch.join(items, list(range(len(rows))))
    assert batch.step() == [(longest, first)]
    shortest_rest = max(layer_length(r[1]) for i, r in enumerate(rows) if i != longest)
    assert layer_length(batch._cache) == shortest_rest + 1  # the longest remaining row's prompt + one token
    while batch:
        batch.step()

