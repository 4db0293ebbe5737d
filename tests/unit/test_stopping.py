"""StopStringMatcher: what each piece releases, when a stop matches, and what flush gives back."""

from __future__ import annotations

import itertools

import pytest

from model.stopping import StopStringMatcher

pytestmark = pytest.mark.timeout(30)


def earliest_cut(text: str, stops: tuple[str, ...]) -> str:
    """The text a correct matcher releases in total: everything before the first stop that occurs."""
    cuts = [i for s in stops if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def run_matcher(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopStringMatcher(stops)
    emitted = [matcher.feed(p) for p in pieces]
    matched = matcher.matched
    return emitted, matched, matcher.flush()


@pytest.mark.parametrize(
    ("stops", "pieces", "emitted", "matched", "flushed"),
    [
        pytest.param((), ["ab", "c"], ["ab", "c"], False, "", id="no-stops-passes-through"),
        pytest.param(("",), ["abc"], ["abc"], False, "", id="empty-stop-ignored"),
        pytest.param(("lo",), ["hello world"], ["hel"], True, "", id="match-inside-one-piece"),
        pytest.param(("lo w",), ["hel", "lo", " wor"], ["he", "l", ""], True, "", id="across-three-pieces"),
        pytest.param(("ab",), ["a", "b", "c"], ["", "", ""], True, "", id="stop-at-very-start"),
        pytest.param(("ab",), ["ab"], [""], True, "", id="stop-is-whole-text"),
        pytest.param(("abc", "ab"), ["xa", "bc"], ["x", ""], True, "", id="overlapping-shorter-wins"),
        pytest.param(("ab", "abc"), ["xabc"], ["x"], True, "", id="overlapping-order-irrelevant"),
        pytest.param(("abc", "bcd"), ["xab", "cd"], ["x", ""], True, "", id="two-stops-earliest-start-wins"),
        pytest.param(("bcd", "c"), ["abcd"], ["a"], True, "", id="earlier-start-beats-earlier-end"),
        pytest.param(("abc",), ["xab", "d"], ["x", "abd"], False, "", id="held-prefix-released-on-mismatch"),
        pytest.param(("abc",), ["xa", "b"], ["x", ""], False, "ab", id="flush-releases-held-tail"),
        pytest.param(("abcdef",), ["abc"], [""], False, "abc", id="stop-longer-than-text"),
        pytest.param(("b",), ["ab", "cd"], ["a", ""], True, "", id="everything-dropped-after-match"),
        pytest.param(("aab",), ["a", "a", "a", "b"], ["", "", "a", ""], True, "", id="self-overlapping-stop"),
        pytest.param(("ab",), ["", "a", "", "b"], ["", "", "", ""], True, "", id="empty-pieces"),
        pytest.param(("\n\n",), ["line\n", "\nnext"], ["line", ""], True, "", id="double-newline"),
        pytest.param(("🚀",), ["Hi ", "🚀", " there"], ["Hi ", "", ""], True, "", id="emoji-stop"),
        pytest.param(("мир",), ["При", "вет, м", "ир!"], ["При", "вет, ", ""], True, "", id="cyrillic"),
        pytest.param(("ёж",), ["ё", "ё", "ж"], ["", "ё", ""], True, "", id="cyrillic-repeated-prefix"),
        pytest.param(("👨‍👩‍👧",), ["a👨‍", "👩‍👦"], ["a", "👨‍👩‍👦"], False, "", id="zwj-family-mismatch"),
        pytest.param(("x", "yz"), ["ay", "b"], ["a", "yb"], False, "", id="multi-stops-no-match"),
        pytest.param(("END", "STOP"), ["ok S", "TO", "P now"], ["ok ", "", ""], True, "", id="multi-second"),
    ],
)
def test_matcher_table(
    stops: tuple[str, ...], pieces: list[str], emitted: list[str], matched: bool, flushed: str
) -> None:
    assert run_matcher(stops, pieces) == (emitted, matched, flushed)


def test_flush_twice_gives_nothing_more() -> None:
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xab") == "x"
    assert matcher.flush() == "ab"
    assert matcher.flush() == ""


CHUNKING_CASES = [
    ("hello world", ("lo w",)),
    ("hello world", ("xyz",)),
    ("hello world", ("world!",)),
    ("aaab", ("aab",)),
    ("abcabcabd", ("abcabd", "cab")),
    ("Привет, мир! 🚀 Как дела?", ("🚀 К", "дела")),
    ("Привет, мир!", ("мир?",)),
    ("stop", ("stop",)),
    ("", ("a",)),
    ("no stops at all", ()),
]


@pytest.mark.parametrize(("text", "stops"), CHUNKING_CASES)
def test_every_two_and_three_way_split_releases_the_same_text(text: str, stops: tuple[str, ...]) -> None:
    """However the text is chunked, the released text is the prefix before the first stop, and no
    step ever releases text that a later step would have to take back."""
    expected = earliest_cut(text, stops)
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        matcher = StopStringMatcher(stops)
        released = ""
        for piece in (text[:i], text[i:j], text[j:]):
            released += matcher.feed(piece)
            assert expected.startswith(released), (i, j)
        assert matcher.matched == any(s and s in text for s in stops)
        assert released + matcher.flush() == expected, (i, j)


@pytest.mark.parametrize(("text", "stops"), CHUNKING_CASES)
def test_one_character_at_a_time(text: str, stops: tuple[str, ...]) -> None:
    matcher = StopStringMatcher(stops)
    released = "".join(matcher.feed(ch) for ch in text)
    assert released + matcher.flush() == earliest_cut(text, stops)
