"""The staging copy with non-temporal stores (guardian/_streamcopy.c) must be a plain,
exact byte copy at every size and alignment, refuse what it cannot copy safely, and
leave checkpoints byte-identical to the numpy path and to synchronous saves."""

from __future__ import annotations

import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch
from test_async_writer import assert_same_files, hostile_states, save_with

from guardian import staging
from guardian.async_writer import AsyncWriter
from guardian.writer import SyncWriter

streamcopy = pytest.importorskip("guardian._streamcopy", reason="C extension not built (no compiler?)")

SIZES = [0, 1, 63, 64, 65, 255, 256, 257, 4095, 4096 + 17, (1 << 20) - 1, (1 << 20) + 333, 3 * (1 << 20) + 7]
OFFSETS = [(0, 0), (1, 0), (0, 1), (13, 7), (64, 3), (63, 64)]


def test_extension_is_built_where_a_compiler_exists():
    """A silent fallback would cost ~25 % of every stall: where the set-up could build
    the extension, it must have (this is the test's reason to exist, not a skip)."""
    include = sysconfig.get_paths()["include"]
    if not (shutil.which("cc") and os.path.exists(os.path.join(include, "Python.h"))):
        pytest.skip("no C compiler or Python headers here: the numpy fallback is expected")
    assert streamcopy.KIND in ("avx2", "sse2", "memcpy")
    if streamcopy.KIND != "memcpy":  # x86-64: streaming stores
        assert staging.copy_implementation() == f"non-temporal stores ({streamcopy.KIND})"


@pytest.mark.parametrize("sse2_only", [False, True], ids=["best", "sse2"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dst_off,src_off", OFFSETS)
def test_copy_is_exact_at_every_size_and_alignment(size, dst_off, src_off, sse2_only):
    rng = np.random.default_rng(size * 131 + dst_off * 7 + src_off)
    src_buf = rng.integers(0, 256, size + src_off + 64, dtype=np.uint8)
    dst_buf = np.full(size + dst_off + 64, 0xAB, dtype=np.uint8)
    src = src_buf[src_off : src_off + size]
    streamcopy.copy(dst_buf[dst_off : dst_off + size], src, sse2_only)
    assert np.array_equal(dst_buf[dst_off : dst_off + size], src)
    # nothing outside the slot is touched
    assert (dst_buf[:dst_off] == 0xAB).all() and (dst_buf[dst_off + size :] == 0xAB).all()


def test_refuses_mismatched_read_only_and_strided_buffers():
    src = np.arange(4096, dtype=np.uint8)
    with pytest.raises(ValueError, match="4095 bytes, source 4096"):
        streamcopy.copy(np.empty(4095, dtype=np.uint8), src)
    with pytest.raises(TypeError):
        streamcopy.copy(bytes(4096), src)  # destination is read-only
    with pytest.raises(TypeError):  # a strided view exports no simple buffer
        streamcopy.copy(np.empty(8192, dtype=np.uint8)[::2], src)
    with pytest.raises(ValueError, match="contiguous"):
        streamcopy.copy(np.empty(4096, dtype=np.uint8), np.arange(8192, dtype=np.uint8)[::2])


def test_copy_into_arena_takes_either_path_with_the_same_result(monkeypatch):
    src = torch.randn(600_000).view(torch.uint8).numpy()  # 2.4 MB: above STREAM_MIN
    for setting in ("1", "0"):
        monkeypatch.setenv("GUARDIAN_STREAM_COPY", setting)
        dst = np.zeros_like(src)
        staging.copy_into_arena(dst, src)
        assert np.array_equal(dst, src)
    assert staging.copy_implementation() == "numpy (GUARDIAN_STREAM_COPY=0)"


@pytest.mark.parametrize("stream", ["1", "0"])
def test_async_saves_with_and_without_streaming_equal_sync(tmp_path, monkeypatch, stream):
    monkeypatch.setenv("GUARDIAN_STREAM_COPY", stream)
    states = hostile_states()
    states["odd"][1]["big"] = torch.randn(700_001)  # one tensor on the streaming path
    states["odd"][1]["big_bf16"] = torch.randn(900_003, dtype=torch.bfloat16)
    sync = save_with(SyncWriter(), str(tmp_path), "ckpt-sync", states)
    assert_same_files(sync, save_with(AsyncWriter(), str(tmp_path), "ckpt-async", states))
