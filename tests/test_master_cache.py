"""The master-pattern cache: a second identical request reads the file, never simulates."""

import logging

import numpy as np
import pytest

import dpm.master
from dpm.crystal import get_phase
from dpm.master.cache import cached_master_pattern, input_hash


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_second_request_is_read_not_simulated(cache, monkeypatch):
    first = cached_master_pattern("li", kv=20, npx=30)
    assert len(list(cache.glob("*.h5"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("simulated again")

    monkeypatch.setattr(dpm.master, "simulate_master_pattern", fail)
    again = cached_master_pattern("li", kv=20, npx=30)
    np.testing.assert_array_equal(again.northern, first.northern)
    np.testing.assert_array_equal(again.southern, first.southern)
    assert again.energy == 20 and again.phase.name == "li"


def test_key_changes_with_every_input():
    li, na = get_phase("li"), get_phase("na")
    base = input_hash(li, 20, 50, "kinematical", {})
    assert len({base, input_hash(na, 20, 50, "kinematical", {}),
                input_hash(li, 10, 50, "kinematical", {}),
                input_hash(li, 20, 60, "kinematical", {}),
                input_hash(li, 20, 50, "kinematical", {"dmin": 0.1})}) == 5
    hot = get_phase("li")
    hot.structure[0].Bisoequiv = 9.0
    assert input_hash(hot, 20, 50, "kinematical", {}) != base


def test_unwritable_cache_still_returns_the_pattern(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DPM_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="dpm"):
        mp = cached_master_pattern("li", kv=20, npx=20)
    assert mp.npx == 20 and "could not cache" in caplog.text


def test_damaged_entry_is_simulated_again(cache, caplog):
    cached_master_pattern("li", kv=20, npx=20)
    entry = next(cache.glob("*.h5"))
    entry.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="dpm"):
        mp = cached_master_pattern("li", kv=20, npx=20)
    assert mp.npx == 20 and "ignoring unreadable cache entry" in caplog.text
