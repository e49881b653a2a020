"""Unit tests build models in the pytest process: megatron's groups for one process must exist first.

The model creates no process group itself (the runtime or a tool does); here
a one-process gloo group stands in for the runtime of a single CPU process.
"""

import pytest


@pytest.fixture(autouse=True, scope="session")
def one_process_groups():
    from parallel.megatron_setup import init_model_parallel

    init_model_parallel()
