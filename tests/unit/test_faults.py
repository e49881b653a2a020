"""MTP_FAULT parsing and when a fault strikes."""

import pytest

from pretrain.faults import Fault, parse


@pytest.mark.parametrize("spec, fault", [
    ("kill@6:1", Fault("kill", 6, 6, 1)),
    ("nan@3-4", Fault("nan", 3, 4, None)),
    ("kill-in-save@8:0", Fault("kill-in-save", 8, 8, 0)),
    (" hang@7 ", Fault("hang", 7, 7, None)),
])
def test_parse(spec, fault):
    assert parse(spec) == fault


@pytest.mark.parametrize("spec, needle", [
    ("explode@3", "KIND@STEP"), ("kill", "KIND@STEP"), ("kill@0", "count from 1"), ("nan@5-3", "range goes up"),
    ("kill@3:x", "KIND@STEP"),
])
def test_parse_rejects(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse(spec)


def test_strikes_only_its_steps_ranks_and_first_attempt(monkeypatch):
    fault = parse("kill@6-7:1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert [fault.strikes("kill", s, 1) for s in (5, 6, 7, 8)] == [False, True, True, False]
    assert not fault.strikes("kill", 6, 0) and not fault.strikes("hang", 6, 1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not fault.strikes("kill", 6, 1)  # the restarted group recovers


def test_nan_strikes_every_attempt(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert parse("nan@3").strikes("nan", 3, 0)
