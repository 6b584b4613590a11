import pytest

from stillroom.evaluate.metrics import INVALID, classification_metrics, cost_metrics
from stillroom.evaluate.runner import parse_choice


def test_macro_f1_and_per_class_match_hand_computation():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "b", None, "b", "b", "a"]
    m = classification_metrics(gold, pred, ["a", "b", "c"])
    # a: tp1 fp1 fn2 -> p .5 r 1/3 f1 .4 ; b: tp2 fp1 fn0 -> p 2/3 r 1 f1 .8 ; c: 0
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.4)
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["invalid_rate"] == pytest.approx(1 / 6)
    # confusion: rows gold a,b,c ; columns a,b,c,<invalid>
    assert m["confusion_columns"] == ["a", "b", "c", INVALID]
    assert m["confusion"] == [[1, 1, 0, 1], [0, 2, 0, 0], [1, 0, 0, 0]]


def test_cost_metrics_percentiles():
    c = cost_metrics([10, 20], [1, 3], [0.1, 0.2, 0.3, 0.4, 10.0])
    assert c["input_tokens_mean"] == 15
    assert c["latency_p50_s"] == pytest.approx(0.3)
    assert c["latency_p95_s"] > 0.4


@pytest.mark.parametrize(
    "text,expected",
    [
        ("plausible", "plausible"),
        ("Implausible.", "implausible"),
        ("  IMPLAUSIBLE because nobody does that", "implausible"),
        ("I think it is plausible", "plausible"),
        ("Reasoning...\nAnswer: implausible", "implausible"),
        ("b", "implausible"),
        ("(A)", "plausible"),
        ("maybe", None),
        ("", None),
        ("plausible or implausible, hard to say", None),
    ],
)
def test_parse_choice_is_tolerant_but_never_guesses(text, expected):
    assert parse_choice(text, ["plausible", "implausible"]) == expected
