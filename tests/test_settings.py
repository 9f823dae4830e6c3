"""Numeric settings from the environment are parsed strictly, and a bad one names itself."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from esper_site.settings import _flag, _number


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0.5), ("  ", 0.5), ("0.25", 0.25), ("1e-1", 0.1), (" 1 ", 1.0), ("0", 0.0)],
)
def test_a_float_setting_reads_what_python_reads(monkeypatch, text, expected):
    monkeypatch.setenv("ESPER_TEST_NUMBER", text)
    assert _number("ESPER_TEST_NUMBER", 0.5, low=0.0, high=1.0) == expected


def test_an_unset_setting_is_its_default(monkeypatch):
    monkeypatch.delenv("ESPER_TEST_NUMBER", raising=False)
    assert _number("ESPER_TEST_NUMBER", 200, low=0) == 200


@pytest.mark.parametrize("text", ["0.5abc", "x0.9", "0,3", "1.5.2", "abc", "nan", "inf", "-inf"])
def test_a_float_setting_that_is_not_a_finite_number_is_refused_by_name(monkeypatch, text):
    monkeypatch.setenv("ESPER_TEST_NUMBER", text)
    with pytest.raises(ImproperlyConfigured) as err:
        _number("ESPER_TEST_NUMBER", 0.5, low=0.0, high=1.0)
    assert str(err.value) == f"ESPER_TEST_NUMBER must be a number in [0, 1], got {text!r}"


@pytest.mark.parametrize("text", ["2", "-0.1"])
def test_a_float_setting_out_of_range_is_refused(monkeypatch, text):
    monkeypatch.setenv("ESPER_TEST_NUMBER", text)
    with pytest.raises(ImproperlyConfigured, match=r"must be a number in \[0, 1\]"):
        _number("ESPER_TEST_NUMBER", 0.5, low=0.0, high=1.0)


@pytest.mark.parametrize("text", ["1.5", "20abc", "-1", "1e3"])
def test_an_integer_setting_takes_whole_numbers_within_its_bound(monkeypatch, text):
    monkeypatch.setenv("ESPER_TEST_NUMBER", text)
    with pytest.raises(ImproperlyConfigured) as err:
        _number("ESPER_TEST_NUMBER", 200, low=0)
    assert str(err.value) == f"ESPER_TEST_NUMBER must be an integer >= 0, got {text!r}"


def test_an_integer_setting_reads_an_integer(monkeypatch):
    monkeypatch.setenv("ESPER_TEST_NUMBER", "50")
    assert _number("ESPER_TEST_NUMBER", 200, low=0) == 50


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", True), (" ", True), ("0", False), ("1", True), ("off", False), (" FALSE ", False),
     ("yes", True), ("On", True), ("no", False)],
)  # fmt: skip
def test_a_flag_setting_reads_the_usual_words(monkeypatch, text, expected):
    monkeypatch.setenv("ESPER_TEST_FLAG", text)
    assert _flag("ESPER_TEST_FLAG", True) is expected


@pytest.mark.parametrize("text", ["2", "ture", "disabled", "0.0"])
def test_a_flag_setting_that_is_not_a_flag_word_is_refused_by_name(monkeypatch, text):
    monkeypatch.setenv("ESPER_TEST_FLAG", text)
    with pytest.raises(ImproperlyConfigured) as err:
        _flag("ESPER_TEST_FLAG", True)
    assert str(err.value) == (
        f"ESPER_TEST_FLAG must be one of 1/0, true/false, yes/no, on/off, got {text!r}"
    )
