"""Test-wide settings: one torch thread (tiny tensors gain nothing from more, and the
suite stays fast and steady on a shared 2-core machine)."""

import torch

torch.set_num_threads(1)
