"""How a network runs (gradloc.models.execution): memory format per family, --amp per device, the allocator."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from gradloc.models import execution as ex
from gradloc.models.build import build_architecture
from gradloc.models.execution import Execution, resolve_execution
from gradloc.models.registry import CHANNELS_LAST_FAMILIES
from tests.conftest import ROOT

CPU = torch.device("cpu")


@pytest.fixture
def cpu_bfloat16(monkeypatch: pytest.MonkeyPatch):
    """``cpu_bfloat16(flag)``: make torch report (or not) native bfloat16 on this CPU (AVX512-BF16 / AMX)."""
    ex._note_float32.cache_clear()  # the note is logged once per process

    def simulate(flag: bool) -> None:
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, name, lambda: flag, raising=False)

    yield simulate
    ex._note_float32.cache_clear()


def test_channels_last_follows_the_family_registry_unless_asked():
    assert {"efficientnet_lite", "resnet", "vgg", "demo"} <= CHANNELS_LAST_FAMILIES
    assert resolve_execution(CPU, "resnet").memory_format == "channels_last"
    assert resolve_execution(CPU, "densenet").memory_format == "contiguous"  # not measured: NCHW
    assert resolve_execution(CPU, "resnet", channels_last=False).memory_format == "contiguous"
    assert resolve_execution(CPU, "densenet", channels_last=True).memory_format == "channels_last"


def test_amp_on_a_cpu_with_bfloat16_is_bfloat16(cpu_bfloat16):
    cpu_bfloat16(True)
    assert resolve_execution(CPU, "resnet", amp=True) == Execution(CPU, "channels_last", "bfloat16")
    assert resolve_execution(CPU, "resnet").precision == "float32"


def test_amp_on_a_cpu_without_bfloat16_is_float32_and_one_note(cpu_bfloat16, caplog):
    cpu_bfloat16(False)
    with caplog.at_level(logging.WARNING, logger="gradloc.models.execution"):
        first = resolve_execution(CPU, "efficientnet_lite", amp=True)
        again = resolve_execution(CPU, "efficientnet_lite", amp=True)
    assert first.precision == again.precision == "float32"
    notes = [record.getMessage() for record in caplog.records]
    assert notes == ["--amp: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX); running float32"]


def test_amp_on_cuda_is_float16_and_elsewhere_an_error():
    assert resolve_execution(torch.device("cuda:0"), "resnet", amp=True).precision == "float16"  # no GPU needed
    with pytest.raises(ValueError, match=r"--amp \(cams.amp\) autocasts on cpu or cuda, not on mps; drop --amp"):
        resolve_execution(torch.device("mps"), "resnet", amp=True)


def test_key_names_only_what_differs_from_contiguous_float32():
    assert Execution(CPU).key() == {}
    assert Execution(CPU, "channels_last").key() == {"memory_format": "channels_last"}
    assert Execution(CPU, "contiguous", "bfloat16").key() == {"precision": "bfloat16"}


def test_model_and_inputs_take_the_memory_format():
    model = build_architecture("demo_cnn")
    inputs = torch.randn(2, 3, 32, 32)
    fast = Execution(CPU, "channels_last")
    assert fast.model(model).block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    moved = fast.inputs(inputs)
    assert moved.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved, inputs)
    assert Execution(CPU).inputs(moved).is_contiguous()
    with Execution(CPU, precision="bfloat16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with Execution(CPU).autocast():
        assert not torch.is_autocast_enabled("cpu")


# Page faults of allocating, touching and freeing a 64 MB buffer 5 times, before and after keep_freed_memory.
_FAULTS = r"""
import json, resource
import torch
from gradloc.models.execution import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        buffer = torch.ones(1 << 24)  # 64 MB (torch asks for no huge pages, unlike numpy)
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
plain = faults()
applied = keep_freed_memory()
faults()  # the first buffer under the new thresholds comes from the kernel once
# the least of three: other processes on a loaded machine can make the kernel reclaim a page now and then
print(json.dumps({"plain": plain, "kept": min(faults() for _ in range(3)), "applied": applied}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_stops_refaulting_freed_buffers():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout)
    pages = 5 * (64 << 20) // 4096
    assert counts["applied"], counts
    assert counts["plain"] > pages // 2, counts  # glibc unmaps and the kernel faults every page in again
    assert counts["kept"] < pages // 50, counts
