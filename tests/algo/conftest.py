"""Registers the `slow` marker (multi-process gloo tests) unless the root config already does."""


def pytest_configure(config):
    registered = {line.split(":")[0].strip() for line in config.getini("markers")}
    if "slow" not in registered:
        config.addinivalue_line("markers", "slow: multi-process (gloo) tests; deselect with -m 'not slow'")
