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


@pytest.mark.parametrize("enabled, device, expected", [
    (True, "cpu", True), (False, "cpu", False), (True, "cuda", False), (False, "cuda", False),
])
def test_a_run_keeps_freed_memory_only_on_cpu_and_when_asked(monkeypatch, enabled, device, expected):
    from varq.sample import cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cpu_memory.reuse_for_run(enabled, device) is expected
    assert len(calls) == int(expected)


@pytest.mark.parametrize("flag, expected", [("true", 1), ("false", 0)])
def test_the_command_line_run_applies_reuse_freed_memory(monkeypatch, tmp_path, flag, expected):
    from varq import pipeline
    from varq.run import cli
    from varq.sample import cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(1) or True)

    started = []

    def stop(*_a, **_k):  # the allocator is set before the run starts; nothing more is needed here
        started.append(len(calls))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "run", stop)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["varq-run", "device=cpu", f"reuse_freed_memory={flag}",
                                      f"paths.root={tmp_path}/runs"])
    with pytest.raises(SystemExit):  # Hydra reports the task's exception and exits
        cli()
    assert started == [expected]  # set (or not) before the run began
