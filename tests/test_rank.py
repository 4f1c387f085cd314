"""Ranking: RRF fusion, deterministic ties, the authors' reference order, bad input."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srdata.steps.rank import RankingError, parse_rank_by, rank


def scores_frame(rouge, loss, ids=None, **extra) -> pl.DataFrame:
    ids = list(range(len(rouge))) if ids is None else ids
    return pl.DataFrame({"srd_id": ids, "rouge_l": rouge, "ce_loss": loss, **extra}, schema_overrides={"srd_id": pl.Int64, "rouge_l": pl.Float64, "ce_loss": pl.Float64})


def random_scores(n: int, seed: int, decimals: int = 1) -> pl.DataFrame:
    """Scores with many ties (few decimals), rows shuffled so input order != file order."""
    rng = np.random.default_rng(seed)
    frame = scores_frame(np.round(rng.random(n), decimals).tolist(), np.round(rng.random(n) * 3, decimals).tolist())
    return frame.sample(fraction=1.0, shuffle=True, seed=seed)


# --- independent re-implementations in plain Python ---------------------------------------


def authors_reference(rows: list[dict], k: int = 60) -> dict[int, tuple[int, int, float, int]]:
    """The authors' tools/rank.py ordering, statement for statement, over rows in input order."""
    data = [dict(r) for r in rows]
    by_rouge = sorted(data, key=lambda x: x["rouge_l"], reverse=True)
    for i, row in enumerate(by_rouge):
        row["RoughL_rank"] = i + 1
    by_loss = sorted(by_rouge, key=lambda x: x["ce_loss"], reverse=False)
    for i, row in enumerate(by_loss):
        row["lmloss_rank"] = i + 1
    for row in by_loss:
        row["hybrid_rank_score"] = 1 / (int(row["RoughL_rank"]) + k) + 1 / (int(row["lmloss_rank"]) + k)
    final = sorted(by_loss, key=lambda x: x["hybrid_rank_score"], reverse=True)
    return {r["srd_id"]: (r["RoughL_rank"], r["lmloss_rank"], r["hybrid_rank_score"], i + 1) for i, r in enumerate(final)}


def input_order_reference(rows: list[dict], k: int = 60) -> dict[int, tuple[int, int, float, int]]:
    """The default mode: every sort breaks ties by srd_id ascending."""
    rank_r = {r["srd_id"]: i + 1 for i, r in enumerate(sorted(rows, key=lambda x: (-x["rouge_l"], x["srd_id"])))}
    rank_l = {r["srd_id"]: i + 1 for i, r in enumerate(sorted(rows, key=lambda x: (x["ce_loss"], x["srd_id"])))}
    rrf = {i: 1 / (k + rank_r[i]) + 1 / (k + rank_l[i]) for i in rank_r}
    order = sorted(rrf, key=lambda i: (-rrf[i], i))
    return {i: (rank_r[i], rank_l[i], rrf[i], pos + 1) for pos, i in enumerate(order)}


def as_tuples(ranked: pl.DataFrame) -> dict[int, tuple[int, int, float, int]]:
    cols = ["srd_id", "rank_rouge_l", "rank_ce_loss", "rrf_score", "difficulty_rank"]
    return {r[0]: tuple(r[1:]) for r in ranked.select(cols).iter_rows()}


# --- behaviour ------------------------------------------------------------------------


def test_rank_orders_easy_first_with_contract_types():
    ranked = rank(scores_frame([0.2, 0.9, 0.5], [3.0, 1.0, 2.0]))
    assert ranked["difficulty_rank"].to_list() == [3, 1, 2]
    assert ranked["rank_rouge_l"].to_list() == [3, 1, 2]
    assert ranked["rrf_score"][1] == pytest.approx(2 / 61)
    assert ranked.schema["rank_rouge_l"] == pl.Int64 and ranked.schema["difficulty_rank"] == pl.Int64
    assert ranked.schema["rrf_score"] == pl.Float64


def test_result_is_sorted_by_srd_id_and_keeps_other_columns():
    frame = scores_frame([0.1, 0.5, 0.9], [1.0, 2.0, 3.0], ids=[7, 3, 5], text=["a", "b", "c"])
    ranked = rank(frame)
    assert ranked["srd_id"].to_list() == [3, 5, 7]
    assert ranked["text"].to_list() == ["b", "c", "a"]


def test_invalid_rows_get_null_ranks_and_valid_rows_a_permutation():
    frame = scores_frame([0.5, None, 0.7, 0.1, 0.3], [1.0, None, 2.0, 0.5, 4.0], invalid_reason=[None, "empty prompt", None, "too long", None])
    ranked = rank(frame)
    invalid = ranked.filter(pl.col("invalid_reason").is_not_null())
    assert invalid["difficulty_rank"].null_count() == 2 and invalid["rrf_score"].null_count() == 2
    assert sorted(ranked["difficulty_rank"].drop_nulls().to_list()) == [1, 2, 3]
    assert sorted(ranked["rank_ce_loss"].drop_nulls().to_list()) == [1, 2, 3]


def test_all_rows_invalid_gives_all_null_ranks():
    ranked = rank(scores_frame([None, None], [None, None]))
    assert ranked["difficulty_rank"].null_count() == 2


@pytest.mark.parametrize("seed", range(4))
def test_default_ties_follow_srd_id(seed):
    frame = random_scores(300, seed)
    expected = input_order_reference(frame.sort("srd_id").to_dicts())
    assert as_tuples(rank(frame)) == expected


def test_equal_rrf_is_broken_by_srd_id_by_default_and_by_loss_rank_in_reference_mode():
    # Row 0: best ROUGE-L, second loss; row 1: second ROUGE-L, best loss -> same RRF.
    frame = scores_frame([0.9, 0.8, 0.1], [2.0, 1.0, 3.0])
    default = rank(frame)
    reference = rank(frame, ties="reference")
    assert default["rrf_score"][0] == default["rrf_score"][1]
    assert default["difficulty_rank"].to_list() == [1, 2, 3]
    assert reference["difficulty_rank"].to_list() == [2, 1, 3]


@pytest.mark.parametrize("seed", range(6))
def test_reference_ties_match_the_authors_rank_py(seed):
    frame = random_scores(400, seed, decimals=1 + seed % 2)
    expected = authors_reference(frame.sort("srd_id").to_dicts())
    assert as_tuples(rank(frame, ties="reference")) == expected


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.sampled_from([0.5, 1.0, 1.5])),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=0, max_value=100),
)
def test_reference_ties_property(pairs, k):
    frame = scores_frame([p[0] for p in pairs], [p[1] for p in pairs])
    assert as_tuples(rank(frame, rrf_k=k, ties="reference")) == authors_reference(frame.to_dicts(), k)
    assert as_tuples(rank(frame, rrf_k=k)) == input_order_reference(frame.to_dicts(), k)


def test_rrf_k_changes_the_fused_score():
    frame = scores_frame([0.9, 0.1], [1.0, 2.0])
    assert rank(frame, rrf_k=0)["rrf_score"][0] == pytest.approx(2.0)
    assert rank(frame, rrf_k=10)["rrf_score"][1] == pytest.approx(2 / 12)


def test_default_spec_equals_explicit_spec():
    frame = random_scores(200, 9)
    assert rank(frame).equals(rank(frame, rank_by="rouge_l:desc,ce_loss:asc"))


def test_weighted_fusion_with_a_user_column():
    frame = random_scores(100, 3).with_columns(length=(pl.col("srd_id") * 7 % 13).cast(pl.Int64))
    ranked = rank(frame, rank_by="rouge_l:desc,ce_loss:asc:2,length:asc:0.5")
    expected = 1 / (60 + ranked["rank_rouge_l"]) + 2 / (60 + ranked["rank_ce_loss"]) + 0.5 / (60 + ranked["rank_length"])
    assert np.allclose(ranked["rrf_score"].to_numpy(), expected.to_numpy(), rtol=0, atol=1e-15)
    by_rrf = ranked.sort(["rrf_score", "srd_id"], descending=[True, False])
    assert by_rrf["difficulty_rank"].to_list() == list(range(1, 101))
    assert ranked.sort("rank_length")["length"].is_sorted()


def test_single_column_spec_ranks_by_that_column_and_keeps_contract_ranks_current():
    frame = random_scores(50, 4)
    ranked = rank(frame, rank_by="ce_loss:asc")
    assert ranked["difficulty_rank"].to_list() == ranked["rank_ce_loss"].to_list()
    assert ranked["rank_rouge_l"].to_list() == rank(frame)["rank_rouge_l"].to_list()


def test_parse_rank_by_round_trips():
    keys = parse_rank_by(" rouge_l:DESC , ce_loss:asc:0.5 ")
    assert [(k.column, k.descending, k.weight) for k in keys] == [("rouge_l", True, 1.0), ("ce_loss", False, 0.5)]


# --- bad input ------------------------------------------------------------------------


def test_nan_scores_name_the_column_and_rows():
    frame = scores_frame([0.5, float("nan"), 0.2, float("nan")], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(RankingError, match=r"'rouge_l'.*NaN.*srd_id 1, 3"):
        rank(frame)


def test_nan_in_loss_is_refused_too():
    with pytest.raises(RankingError, match=r"'ce_loss'.*srd_id 0"):
        rank(scores_frame([0.5, 0.4], [float("nan"), 1.0]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing:asc", "does not exist"),
        ("rouge_l", "expected COLUMN:desc|asc"),
        ("rouge_l:up", "bad direction"),
        ("rouge_l:desc:heavy", "bad weight"),
        ("rouge_l:desc:0", "positive finite"),
        ("rouge_l:desc:-1", "positive finite"),
        ("rouge_l:desc,rouge_l:asc", "more than once"),
        ("", "expected COLUMN"),
        ("text:asc", "not numeric"),
    ],
)
def test_bad_rank_by_specs(spec, message):
    frame = scores_frame([0.5], [1.0], text=["x"])
    with pytest.raises(RankingError, match=message):
        rank(frame, rank_by=spec)


def test_bad_settings_and_ids():
    frame = scores_frame([0.5, 0.4], [1.0, 2.0])
    with pytest.raises(RankingError, match="ties mode"):
        rank(frame, ties="random")
    with pytest.raises(RankingError, match="non-negative integer"):
        rank(frame, rrf_k=-1)
    with pytest.raises(RankingError, match="unique"):
        rank(scores_frame([0.5, 0.4], [1.0, 2.0], ids=[1, 1]))  # sorted ids
    with pytest.raises(RankingError, match="unique"):
        rank(scores_frame([0.5, 0.4, 0.3], [1.0, 2.0, 3.0], ids=[2, 1, 2]))  # unsorted ids
    with pytest.raises(RankingError, match="no 'srd_id'"):
        rank(frame.drop("srd_id"))
