"""Security tests run the real CLI; they share the process helpers of the end-to-end tests."""

from tests.e2e.conftest import collectors  # noqa: F401 - a fixture
