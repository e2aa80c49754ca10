"""Shared pytest setup for pvq's tests."""
import gc

import pytest


def pytest_configure(config):
    # Tests that load the real SmolLM2 GGUF (tens of seconds on two cores) carry this marker,
    # so a quick run can skip them with -m "not slow".
    config.addinivalue_line("markers", "slow: needs the real SmolLM2-135M model; takes more than ~20 s")


@pytest.fixture
def fresh_kernel_tables():
    """The native kernel's shared tables and plan cache as in a fresh process, for a test that counts them;
    the tables of before are put back afterwards (and plans rebuilt from them on demand), so later tests
    see the state they would have seen without this one."""
    from pvq.runtime import native

    saved = dict(native._TABLES)
    native._TABLES.clear()
    native.plan.cache_clear()
    try:
        yield native
    finally:
        native._TABLES.clear()
        native._TABLES.update(saved)
        native.plan.cache_clear()


_FULL_COLLECT_EVERY = 25  # tests between two full collections of the test process's heap
_tests_run = 0


@pytest.fixture(autouse=True)
def _settled_test_heap():
    """Freeze what is alive before each test, so the garbage collections pvq runs (pvq.memory: one whole
    collection as each quantize starts, then one per block) walk only what the test makes: the test process
    holds millions of objects (every family's modules, imported as its tests come), and each of those
    collections took a quarter of a second, over a minute of the suite. Every 25 tests the heap is handed back
    and collected whole, so garbage a test leaves in reference cycles waits at most that long."""
    global _tests_run
    _tests_run += 1
    if _tests_run % _FULL_COLLECT_EVERY == 0:
        gc.unfreeze()
        gc.collect()
    gc.freeze()
    yield


def pytest_sessionfinish(session, exitstatus):
    gc.unfreeze()  # what is frozen is never collected, not even as the interpreter exits
