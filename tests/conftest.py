"""Test-wide settings: one torch thread (tiny tensors gain nothing from more, and the
suite stays fast and steady on a shared 2-core machine)."""

import pytest
import torch

import gradosr.data.registry as registry

torch.set_num_threads(1)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian Fashion-MNIST fallback at an empty folder (the real one may exist here)."""
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(registry, "DEBIAN_FASHION_MNIST", empty)
    return empty
