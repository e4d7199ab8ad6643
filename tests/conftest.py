import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests run single-threaded: on 2 shared cores, thin matrix products ran far slower with 2
    threads than with 1. Spawned workers set their own thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
