"""Shared pytest setup for pvq's tests."""
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
