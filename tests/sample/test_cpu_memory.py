"""The opt-in allocator setting: applied in a child process (it changes the whole process), values unchanged."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import torch
from varq.sample.cpu_memory import keep_freed_memory
x = torch.randn(3_000_000, generator=torch.Generator().manual_seed(0))
before = (x / 3.0).sum().item()
ok = keep_freed_memory()
after = [(x / 3.0).sum().item() for _ in range(3)]
print(ok, all(a == before for a in after))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_applies_on_glibc_and_changes_no_values():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]
