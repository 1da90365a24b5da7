"""OptionError: a message template whose options each front end names its own way, and whose values are text."""

from __future__ import annotations

import pytest

from moemerge.errors import MoemergeError, OptionError


def test_options_are_the_fields_that_are_not_values_named_as_themselves():
    error = OptionError("{out} already exists; pass {force} to replace it", out="/tmp/out")
    assert isinstance(error, MoemergeError)
    assert error.options == ("force",)
    assert str(error) == "/tmp/out already exists; pass force to replace it"
    assert error.spelled(lambda option: f"<{option}>") == "/tmp/out already exists; pass <force> to replace it"


def test_a_repeated_option_is_one_option_and_a_dotted_name_is_not_an_attribute():
    error = OptionError("{routing.top_k}: {choice!r}; {device} or {device}", choice="x")
    assert error.options == ("routing.top_k", "device")
    assert str(error) == "routing.top_k: 'x'; device or device"
    assert error.spelled(str.upper) == "ROUTING.TOP_K: 'x'; DEVICE or DEVICE"


def test_braces_in_values_stay_text():
    error = OptionError("{path}: pass {force}", path="/tmp/{force}/{0}")
    assert error.options == ("force",)
    assert error.spelled(lambda option: "--" + option) == "/tmp/{force}/{0}: pass --force"


def test_a_template_without_options_is_its_values():
    error = OptionError("{key}: no weights", key="experts[0]")
    assert error.options == ()
    assert str(error) == error.spelled(lambda option: pytest.fail(f"spelled {option}")) == "experts[0]: no weights"
