"""Fixtures shared by the test modules (helpers are in tests/support.py)."""

import pytest

from tests.support import run_cli, single_thread


@pytest.fixture(scope="module")
def one_thread():
    """One torch (and BLAS) thread for the module's tests: tiny nets and matrices run several times
    slower with two threads on a loaded 2-core machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with single_thread():
        yield


@pytest.fixture
def run_cli_in(tmp_path):
    def run(module, *args, **kw):
        return run_cli(module, *args, cwd=tmp_path, **kw)

    return run
