"""Shared pytest setup for pvq's tests."""


def pytest_configure(config):
    # Tests that load the real SmolLM2 GGUF (tens of seconds on two cores) carry this marker,
    # so a quick run can skip them with -m "not slow".
    config.addinivalue_line("markers", "slow: needs the real SmolLM2-135M model; takes more than ~20 s")
