"""srdata.steps.rouge: exact parity with Google's rouge-score, the Unicode mode, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srdata.steps import rouge
from srdata.steps.rouge import rouge_l

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
rouge_tokenize = pytest.importorskip("rouge_score.tokenize")

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def reference_scores(predictions: list[str], references: list[str]) -> list[float]:
    """What rouge-score 0.1.2 returns, pair by pair (the ground truth)."""
    return [
        _SCORER.score(target=r, prediction=p)["rougeL"].fmeasure
        for p, r in zip(predictions, references)
    ]


# --------------------------------------------------------------------------- #
# Text strategies                                                              #
# --------------------------------------------------------------------------- #

STEMMABLE = [
    "running", "runs", "ran", "cats", "cat", "generously", "generous", "happiness",
    "happily", "studies", "studying", "agreed", "dying", "skies", "ties", "caresses",
    "ponies", "relational", "conditional", "hopeful", "goodness", "formalize",
    "electricity", "adjustable", "the", "a", "of", "is", "was", "gas", "this", "news",
    "feed", "bled", "sing", "sky", "ssss", "abcs", "COVID19", "h2o", "mp3s", "x86",
]
PUNCT = list(".,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`") + ["...", " - ", "\u2014", "\u00bf"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\x0b", "\x0c", ""]
UNICODE = [
    "caf\u00e9", "na\u00efve", "\u00fcber", "Stra\u00dfe", "\u00c5ngstr\u00f6m", "e\u0301t\u00e9",
    "\u212a", "\u0130stanbul", "\u0130", "\ufb01ne", "\uff21\uff22\uff23", "\u00b2", "\u0663",
    "\u6211\u559c\u6b22\u732b", "\u732b", "\u3072\u3089\u304c\u306a", "\u30ab\u30bf\u30ab\u30ca",
    "\ud55c\uad6d\uc5b4", "\u041f\u0440\u0438\u0432\u0435\u0442", "\u043c\u0438\u0440",
    "\u0645\u064e\u0631\u0652\u062d\u064e\u0628\u064b\u0627", "\u0928\u092e\u0938\u094d\u0924\u0947",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", "\U0001f600", "\u0301", "\u00bd",
]
ASCII_WORDS = st.text(
    alphabet=st.characters(min_codepoint=0x30, max_codepoint=0x7A), min_size=1, max_size=12
)
PIECE = st.one_of(
    st.sampled_from(STEMMABLE),
    st.sampled_from(STEMMABLE).map(str.upper),
    st.sampled_from(STEMMABLE).map(str.title),
    st.sampled_from(PUNCT),
    st.sampled_from(SPACES),
    st.integers(0, 10**6).map(str),
    ASCII_WORDS,
    st.sampled_from(UNICODE),
    st.text(max_size=4),  # anything at all, one character class at a time
)
SEPARATOR = st.sampled_from([" ", " ", " ", "\n", ", ", "", "-", "_"])


@st.composite
def texts(draw: st.DrawFn, max_pieces: int = 30) -> str:
    pieces = draw(st.lists(PIECE, max_size=max_pieces))
    out = []
    for piece in pieces:
        out.append(piece)
        out.append(draw(SEPARATOR))
    return "".join(out)


ASCII_PIECE = st.one_of(
    st.sampled_from(STEMMABLE),
    st.sampled_from(STEMMABLE).map(str.upper),
    st.sampled_from(PUNCT[:-2]),
    st.sampled_from([" ", "  ", "\t", "\n", "", "_"]),
    st.integers(0, 10**6).map(str),
    ASCII_WORDS,
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=6),
)


@st.composite
def ascii_texts(draw: st.DrawFn) -> str:
    return " ".join(draw(st.lists(ASCII_PIECE, max_size=30)))


pair_lists = st.lists(st.tuples(texts(), texts()), min_size=1, max_size=4)
HYPOTHESIS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --------------------------------------------------------------------------- #
# Exact parity with rouge-score                                                #
# --------------------------------------------------------------------------- #


@HYPOTHESIS
@given(pairs=pair_lists)
def test_default_matches_rouge_score_exactly(pairs: list[tuple[str, str]]) -> None:
    predictions = [p for p, _ in pairs]
    references = [r for _, r in pairs]
    assert rouge_l(predictions, references) == reference_scores(predictions, references)


@HYPOTHESIS
@given(prediction=texts(), reference=texts())
def test_overlapping_texts_match_rouge_score_exactly(prediction: str, reference: str) -> None:
    # Independent texts rarely share tokens; splice them so the LCS is non-trivial.
    prediction = prediction + " " + reference[: len(reference) // 2]
    reference = reference + " " + prediction[len(prediction) // 3 :]
    assert rouge_l([prediction], [reference]) == reference_scores([prediction], [reference])


@settings(max_examples=100, deadline=None)
@given(prediction=st.text(max_size=80), reference=st.text(max_size=80))
def test_arbitrary_unicode_matches_rouge_score_exactly(prediction: str, reference: str) -> None:
    assert rouge_l([prediction], [reference]) == reference_scores([prediction], [reference])


def test_real_selfinst_pairs_match_rouge_score_exactly(shared_data_dir: Path) -> None:
    pl = pytest.importorskip("polars")
    path = shared_data_dir / "selfinst-predictions.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    frame = pl.read_parquet(path, columns=["prediction", "reference"])
    predictions = frame["prediction"].to_list()
    references = frame["reference"].to_list()
    assert len(predictions) == 1008

    rouge._reset_caches()  # cold cache
    cold = rouge_l(predictions, references)
    warm = rouge_l(predictions, references)
    expected = reference_scores(predictions, references)
    mismatches = [i for i, (a, b) in enumerate(zip(cold, expected)) if a != b]
    assert mismatches == [], f"{len(mismatches)} rows differ, first: {mismatches[:5]}"
    assert warm == expected
    assert any(0.0 < s < 1.0 for s in expected)


def test_cache_replacement_mid_call_keeps_parity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rouge, "_MAX_CACHED_TOKENS", 5)
    predictions = ["The cats were running to the generously sized house"] * 3 + [
        "studies agreed 42 times"
    ]
    references = ["a cat runs to the house generously", "", "cats", "study agree 42 time"]
    before = rouge._current_vocab()
    assert rouge_l(predictions, references) == reference_scores(predictions, references)
    assert rouge._current_vocab() is not before
    assert rouge_l(predictions, references, "unicode") == reference_scores(
        predictions, references
    )


# --------------------------------------------------------------------------- #
# Edge cases                                                                   #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("tokenizer", ["default", "unicode"])
def test_edge_cases(tokenizer: str) -> None:
    assert rouge_l([], [], tokenizer) == []
    assert rouge_l([""], [""], tokenizer) == [0.0]
    assert rouge_l(["", "some words"], ["some words", ""], tokenizer) == [0.0, 0.0]
    assert rouge_l(["!!! ... ???"], ["-- ;; --"], tokenizer) == [0.0]
    assert rouge_l(["   \n\t "], ["words"], tokenizer) == [0.0]
    assert rouge_l(["no overlap here"], ["completely different"], tokenizer) == [0.0]
    text = "The quick brown fox jumps over the lazy dog."
    assert rouge_l([text], [text], tokenizer) == [1.0]
    assert rouge_l(["The cats running"], ["the cat runs!"], tokenizer) == [1.0]
    scores = rouge_l(["The cats are running home"], ["a cat runs home"], tokenizer)
    assert all(type(s) is float for s in scores)


def test_edge_cases_match_rouge_score() -> None:
    cases = [
        ("", ""),
        ("", "abc"),
        ("abc", ""),
        ("...", "abc"),
        ("\ud800abc", "abc"),  # lone surrogate: a separator, as in rouge-score
        ("\u212aelvin", "kelvin"),  # KELVIN SIGN lower-cases to ASCII k
        ("\u0130stanbul", "i stanbul"),  # I WITH DOT lower-cases to i + U+0307
        ("Stra\u00dfe", "strasse"),
        ("under_score", "under score"),
        ("a" * 5000, "a" * 3),
        (" ".join(["word"] * 700), " ".join(["words", "other"] * 400)),
    ]
    predictions = [p for p, _ in cases]
    references = [r for _, r in cases]
    assert rouge_l(predictions, references) == reference_scores(predictions, references)


def test_accepts_tuples_iterables_and_str_subclasses() -> None:
    class Text(str):
        pass

    expected = rouge_l(["cats running"], ["a cat runs"])
    assert rouge_l(("cats running",), ("a cat runs",)) == expected
    assert rouge_l(iter(["cats running"]), (t for t in ["a cat runs"])) == expected
    assert rouge_l([Text("cats running")], [Text("a cat runs")]) == expected
    np = pytest.importorskip("numpy")
    assert rouge_l(np.array(["cats running"]), np.array(["a cat runs"])) == expected


# --------------------------------------------------------------------------- #
# Unicode tokenizer                                                            #
# --------------------------------------------------------------------------- #


def test_unicode_scores_cjk_that_default_scores_zero() -> None:
    chinese = "\u6211\u559c\u6b22\u732b"  # 我喜欢猫
    assert rouge_l([chinese], [chinese]) == [0.0]
    assert rouge_l([chinese], [chinese], tokenizer="unicode") == [1.0]
    # 我喜欢猫 vs 我喜欢狗: 4 tokens each, LCS 3 -> P = R = F = 0.75
    dog = "\u6211\u559c\u6b22\u72d7"
    assert rouge_l([chinese], [dog], tokenizer="unicode") == [0.75]
    # ねこが好きです vs ねこが好き: LCS 5, P = 5/7, R = 1
    (score,) = rouge_l(
        ["\u306d\u3053\u304c\u597d\u304d\u3067\u3059"],
        ["\u306d\u3053\u304c\u597d\u304d"],
        tokenizer="unicode",
    )
    assert score == pytest.approx(2 * (5 / 7) / (5 / 7 + 1))
    # Korean: each Hangul syllable is a token.
    assert rouge_l(["\ud55c\uad6d\uc5b4"], ["\ud55c\uad6d"], tokenizer="unicode") == [0.8]


def test_unicode_tokens() -> None:
    tokens = rouge._tokens_unicode
    assert tokens("\u6211\u559c\u6b22\u732b") == ["\u6211", "\u559c", "\u6b22", "\u732b"]
    assert tokens("Hello, \u4e16\u754c! 42") == ["hello", "\u4e16", "\u754c", "42"]
    assert tokens("\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!") == [
        "\u043f\u0440\u0438\u0432\u0435\u0442",
        "\u043c\u0438\u0440",
    ]
    # Combining marks stay inside their word (Devanagari virama, Arabic harakat).
    assert tokens("\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e") == [
        "\u0928\u092e\u0938\u094d\u0924\u0947",
        "\u0926\u0941\u0928\u093f\u092f\u093e",
    ]
    arabic = "\u0645\u064e\u0631\u0652\u062d\u064e\u0628\u064b\u0627"
    assert tokens(arabic) == [arabic]
    # NFKC + case folding; underscore is a separator.
    assert tokens("\uff21\uff22\uff23 \ufb01ne Stra\u00dfe snake_case") == [
        "abc", "fine", "strasse", "snake", "case",
    ]
    # Precomposed and decomposed accents give the same token.
    assert tokens("caf\u00e9") == tokens("cafe\u0301") == ["caf\u00e9"]


def test_unicode_mode_other_scripts_and_stemming() -> None:
    russian = "\u041a\u043e\u0448\u043a\u0438 \u0431\u0435\u0433\u0430\u044e\u0442"
    assert rouge_l([russian], [russian]) == [0.0]
    assert rouge_l([russian], [russian.lower()], tokenizer="unicode") == [1.0]
    arabic = "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645"
    assert rouge_l([arabic], [arabic], tokenizer="unicode") == [1.0]
    # ASCII tokens are still Porter-stemmed next to non-Latin text.
    assert rouge_l(
        ["The cats running \u732b"], ["the cat runs \u732b"], tokenizer="unicode"
    ) == [1.0]
    assert rouge_l(["caf\u00e9 au lait"], ["CAFE\u0301 au lait"], tokenizer="unicode") == [1.0]
    # Partial overlap: LCS("x y 猫 狗", "x 猫 z") = 2 -> P = 1/2, R = 2/3.
    (score,) = rouge_l(["x y \u732b\u72d7"], ["x \u732b z"], tokenizer="unicode")
    assert score == 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)


@HYPOTHESIS
@given(prediction=ascii_texts(), reference=ascii_texts())
def test_unicode_equals_default_on_ascii(prediction: str, reference: str) -> None:
    default = rouge_l([prediction], [reference])
    assert rouge_l([prediction], [reference], tokenizer="unicode") == default
    # Force the generic Unicode path (a non-ASCII separator defeats the ASCII fast
    # path) so that the general tokenizer itself is checked, stemming included.
    forced = rouge_l([prediction + " \u2014"], [reference + " \u2014"], tokenizer="unicode")
    assert forced == default
    assert rouge._tokens_unicode(prediction + " \u2014") == rouge_tokenize.tokenize(
        prediction, None
    )
    assert default == reference_scores([prediction], [reference])


# --------------------------------------------------------------------------- #
# Errors                                                                       #
# --------------------------------------------------------------------------- #


def test_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match=r"got 2 predictions and 3 references"):
        rouge_l(["a", "b"], ["a", "b", "c"])


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["ok", None], ["ok", "ok"], r"predictions\[1\] must be a str, got NoneType"),
        (["ok", "ok"], ["ok", 3], r"references\[1\] must be a str, got int"),
        ([b"bytes"], ["ok"], r"predictions\[0\] must be a str, got bytes"),
        ([float("nan")], ["ok"], r"predictions\[0\] must be a str, got float"),
    ],
)
def test_non_string_element_names_index_and_type(
    predictions: list, references: list, message: str
) -> None:
    for tokenizer in ("default", "unicode"):
        with pytest.raises(TypeError, match=message):
            rouge_l(predictions, references, tokenizer)


def test_single_string_or_non_sequence_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"predictions must be a sequence of strings, not a single str"):
        rouge_l("a prediction", ["a reference"])
    with pytest.raises(TypeError, match=r"references must be a sequence of strings, got NoneType"):
        rouge_l(["a prediction"], None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["Default", "icu", "", None])
def test_unknown_tokenizer_lists_valid_ones(name: object) -> None:
    with pytest.raises(ValueError, match=r"unknown tokenizer .*valid tokenizers: 'default', 'unicode'"):
        rouge_l(["a"], ["a"], tokenizer=name)  # type: ignore[arg-type]


def test_docstring_example() -> None:
    import doctest

    failures, _ = doctest.testmod(rouge, verbose=False)
    assert failures == 0
