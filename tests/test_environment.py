"""distillm.environment: on/off switches and the launcher's world size, read from the environment."""

from __future__ import annotations

import logging

import pytest

from distillm.environment import launched_processes, switched_on

logger = logging.getLogger("distillm.test_environment")


@pytest.mark.parametrize("value, on", [(None, True), ("", True), ("1", True), ("0", False)])
def test_a_switch_is_on_unless_it_is_0(monkeypatch, caplog, value, on):
    if value is None:
        monkeypatch.delenv("DISTILLM_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("DISTILLM_TEST_SWITCH", value)
    with caplog.at_level(logging.WARNING):
        assert switched_on("DISTILLM_TEST_SWITCH", "it stays on", logger) is on
    assert caplog.text == ""


def test_another_value_is_named_in_a_warning_on_the_callers_logger_and_stays_on(monkeypatch, caplog):
    monkeypatch.setenv("DISTILLM_TEST_SWITCH", "off")
    with caplog.at_level(logging.WARNING):
        assert switched_on("DISTILLM_TEST_SWITCH", "it stays on", logger) is True
    [record] = caplog.records
    assert record.name == "distillm.test_environment"
    assert record.getMessage() == "DISTILLM_TEST_SWITCH='off' is neither 0 (off) nor 1 (on): it stays on"


@pytest.mark.parametrize("value, processes", [(None, 1), ("1", 1), ("2", 2), (" 8 ", 8), ("", 1), ("two", 1)])
def test_the_launched_processes_are_world_size_or_one(monkeypatch, value, processes):
    if value is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", value)
    assert launched_processes() == processes
