"""The GPU tests train on the integration tests' small stdlib corpus."""

from tests.integration.conftest import small_corpus  # noqa: F401  (a fixture, found by pytest by name)
