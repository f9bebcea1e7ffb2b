"""Damaged checkpoints: every kind of damage is reported precisely, and resume falls back.

Bit flips (tensor data, safetensors header, manifest), truncation at many offsets,
missing / extra / zero-length files, a checkpoint directory replaced by a symlink.
``inspect_checkpoint`` must name the damaged file and the problem; ``newest_valid``
must skip the damaged checkpoint and return the previous good one.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from guardian.commit import set_aside
from guardian.format import manifest as manifest_mod
from guardian.format.hashing import hash_file
from guardian.format.layout import MANIFEST_FILE, SET_ASIDE_DIR, STATE_FILE, TENSORS_FILE, checkpoint_name
from guardian.format.reader import inspect_checkpoint, list_checkpoints, newest_valid

STEP1, STEP2 = checkpoint_name(1), checkpoint_name(2)


def ckpt(run: str, name: str = STEP2) -> str:
    return os.path.join(run, name)


def flip(path: str, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def truncate(path: str, size: int) -> None:
    os.truncate(path, size)


def header_len(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def assert_falls_back(run: str) -> None:
    best = newest_valid(run)
    assert best is not None and best.name == STEP1, best
    assert best.valid and best.verified


def only_problem(path: str) -> str:
    info = inspect_checkpoint(path, verify=True)
    assert not info.valid
    assert len(info.problems) == 1, info.problems
    return info.problems[0]


def test_intact_checkpoints_verify(run):
    infos = list_checkpoints(run, verify=True)
    assert [(i.name, i.valid, i.problems) for i in infos] == [(STEP1, True, []), (STEP2, True, [])]
    assert newest_valid(run).name == STEP2


# ------------------------------------------------------------------------- bit flips


def test_bit_flips_in_tensor_data_are_caught(template, tmp_path):
    src = os.path.join(template, STEP2, TENSORS_FILE)
    start, size = header_len(src), os.path.getsize(src)
    offsets = sorted({start, start + 1, (start + size) // 2, size - 1, *range(start, size, 97)})
    for off in offsets:
        for bit in (0, 7):
            run = str(tmp_path / f"r{off}-{bit}")
            shutil.copytree(template, run)
            target = os.path.join(ckpt(run), TENSORS_FILE)
            flip(target, off, bit)
            msg = only_problem(ckpt(run))
            assert msg.startswith(f"{target}: content hash ") and msg.endswith("(corrupted)"), msg
            assert_falls_back(run)
            shutil.rmtree(run)
    assert len(offsets) >= 10


def test_bit_flips_in_safetensors_header_are_caught(template, tmp_path):
    src = os.path.join(template, STEP2, TENSORS_FILE)
    for off in range(0, header_len(src), 3):
        run = str(tmp_path / f"r{off}")
        shutil.copytree(template, run)
        target = os.path.join(ckpt(run), TENSORS_FILE)
        flip(target, off, off % 8)
        msg = only_problem(ckpt(run))
        assert msg.startswith(f"{target}: content hash ") and "(corrupted)" in msg, msg
        assert_falls_back(run)
        shutil.rmtree(run)


def _rehash(ckpt_dir: str, rel: str) -> None:
    """Make the manifest agree with a damaged file (a buggy or hostile writer)."""
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    with open(path, "rb") as f:
        obj = json.loads(f.read())
    digest, size = hash_file(os.path.join(ckpt_dir, rel))
    obj["files"][rel] = {"bytes": size, "hash": digest}
    obj["manifest_hash"] = manifest_mod.self_hash(obj)  # a hostile writer re-signs too
    with open(path, "w") as f:
        json.dump(obj, f)


def test_malformed_header_with_matching_hash_is_caught(run):
    """A hash proves the bytes are the ones written, not that they parse."""
    target = os.path.join(ckpt(run), TENSORS_FILE)
    with open(target, "r+b") as f:
        f.seek(8)
        f.write(b"[")  # the header's opening '{' becomes '['
    _rehash(ckpt(run), TENSORS_FILE)
    msg = only_problem(ckpt(run))
    assert msg.startswith(f"{target} (safetensors header): not valid JSON"), msg
    assert_falls_back(run)


def test_malformed_state_json_with_matching_hash_is_caught(run):
    target = os.path.join(ckpt(run), STATE_FILE)
    with open(target, "ab") as f:
        f.write(b"}")
    _rehash(ckpt(run), STATE_FILE)
    msg = only_problem(ckpt(run))
    assert msg.startswith(f"{target}: not valid JSON"), msg
    assert_falls_back(run)


def _manifest_flips(template: str, tmp_path):
    """Yield (offset, bit, info, parsed_or_None) for single-bit flips of STEP2's manifest."""
    src = os.path.join(template, STEP2, MANIFEST_FILE)
    with open(src, "rb") as f:
        original = f.read()
    run = str(tmp_path / "flip")
    shutil.copytree(template, run)
    target = os.path.join(ckpt(run), MANIFEST_FILE)
    for off in range(len(original)):
        bit = off % 7  # vary the bit; stays within ASCII so the flip is a plausible error
        damaged = bytearray(original)
        damaged[off] ^= 1 << bit
        with open(target, "wb") as f:
            f.write(damaged)
        info = inspect_checkpoint(ckpt(run), verify=True)
        try:
            parsed = manifest_mod.parse(bytes(damaged), "m")
        except Exception:
            parsed = None
        yield off, bit, info, parsed, target


def test_manifest_bit_flips_that_break_it_are_reported(template, tmp_path):
    original = manifest_mod.read(os.path.join(template, STEP2))
    reported = 0
    for _off, _bit, info, parsed, target in _manifest_flips(template, tmp_path):
        if info.valid:
            continue
        reported += 1
        assert info.problems[0].startswith(target) or info.problems[0].startswith(os.path.dirname(target)), (
            info
        )
        assert parsed is None or parsed != original or info.problems
    assert reported > 100


def test_every_manifest_bit_flip_is_detected_or_harmless(template, tmp_path):
    original = manifest_mod.read(os.path.join(template, STEP2))
    original.created_unix = round(original.created_unix, 6)
    silent = []
    for off, bit, info, parsed, _target in _manifest_flips(template, tmp_path):
        if info.valid and parsed is not None:
            meaning = (
                parsed.name,
                parsed.step,
                parsed.epoch,
                parsed.seq,
                parsed.batch_in_epoch,
                parsed.world_size,
                parsed.files,
                parsed.metrics,
                parsed.components,
                parsed.extra,
            )
            expected = (
                original.name,
                original.step,
                original.epoch,
                original.seq,
                original.batch_in_epoch,
                original.world_size,
                original.files,
                original.metrics,
                original.components,
                original.extra,
            )
            if meaning != expected:
                silent.append((off, bit))
    assert not silent, f"{len(silent)} single-bit manifest flips change its meaning undetected: {silent[:10]}"


# ------------------------------------------------------------------------ truncation


@pytest.mark.parametrize("rel", [TENSORS_FILE, STATE_FILE])
def test_truncated_data_files_are_reported(rel, template, tmp_path):
    size = os.path.getsize(os.path.join(template, STEP2, rel))
    sizes = sorted(
        {0, 1, 7, 8, 9, size // 3, size // 2, size - 8, size - 1, *range(0, size, max(1, size // 25))}
    )
    for cut in sizes:
        run = str(tmp_path / f"r{cut}")
        shutil.copytree(template, run)
        target = os.path.join(ckpt(run), rel)
        truncate(target, cut)
        msg = only_problem(ckpt(run))
        assert msg == f"{target}: size {cut} bytes, manifest says {size} (truncated or overwritten)"
        assert_falls_back(run)
        shutil.rmtree(run)


def test_truncated_manifest_is_reported(template, tmp_path):
    size = os.path.getsize(os.path.join(template, STEP2, MANIFEST_FILE))
    for cut in sorted({0, 1, 2, size // 2, size - 2, *range(0, size, 37)}):
        run = str(tmp_path / f"r{cut}")
        shutil.copytree(template, run)
        target = os.path.join(ckpt(run), MANIFEST_FILE)
        truncate(target, cut)
        msg = only_problem(ckpt(run))
        assert msg.startswith(f"{target}: not valid JSON"), msg
        assert_falls_back(run)
        shutil.rmtree(run)


def test_manifest_without_its_trailing_newline_is_still_valid(run):
    """Dropping only the trailing newline leaves valid JSON whose sizes/hashes still match."""
    target = os.path.join(ckpt(run), MANIFEST_FILE)
    truncate(target, os.path.getsize(target) - 1)
    assert inspect_checkpoint(ckpt(run)).valid  # whitespace only: same meaning, still good
    assert newest_valid(run).name == STEP2


# ------------------------------------------------------- missing, extra, zero-length


@pytest.mark.parametrize("rel", [TENSORS_FILE, STATE_FILE])
def test_missing_file_is_reported(rel, run):
    target = os.path.join(ckpt(run), rel)
    size = os.path.getsize(target)
    os.unlink(target)
    assert only_problem(ckpt(run)) == f"{target}: missing (listed in the manifest with {size} bytes)"
    assert_falls_back(run)


def test_missing_manifest_means_never_committed(run):
    target = os.path.join(ckpt(run), MANIFEST_FILE)
    os.unlink(target)
    assert only_problem(ckpt(run)) == f"{target}: missing (the save never committed)"
    assert_falls_back(run)


@pytest.mark.parametrize("rel", ["extra.bin", "model.pt", "sub/extra.json", ".hidden"])
def test_extra_file_is_reported(rel, run):
    target = os.path.join(ckpt(run), rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
        f.write(b"surprise")
    assert only_problem(ckpt(run)) == f"{target}: not listed in the manifest (unexpected file)"
    assert_falls_back(run)


@pytest.mark.parametrize("rel", [TENSORS_FILE, STATE_FILE])
def test_zero_length_file_is_reported(rel, run):
    target = os.path.join(ckpt(run), rel)
    size = os.path.getsize(target)
    truncate(target, 0)
    assert (
        only_problem(ckpt(run)) == f"{target}: size 0 bytes, manifest says {size} (truncated or overwritten)"
    )
    assert_falls_back(run)


def test_zero_length_manifest_is_reported(run):
    target = os.path.join(ckpt(run), MANIFEST_FILE)
    truncate(target, 0)
    assert only_problem(ckpt(run)).startswith(f"{target}: not valid JSON")
    assert_falls_back(run)


def test_listed_file_replaced_by_directory_is_reported(run):
    target = os.path.join(ckpt(run), STATE_FILE)
    os.unlink(target)
    os.mkdir(target)
    assert only_problem(ckpt(run)).startswith(
        f"{target}: not a regular file (symlinks and devices are refused"
    )
    assert_falls_back(run)


# ------------------------------------------------------------------------- symlinks


def test_checkpoint_dir_replaced_by_symlink_is_refused(run, tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    shutil.move(ckpt(run), elsewhere)  # a perfectly valid checkpoint, but outside the run
    os.symlink(elsewhere, ckpt(run))
    msg = only_problem(ckpt(run))
    assert msg == f"{ckpt(run)}: is a symlink; refusing to follow it out of the run directory"
    assert_falls_back(run)


def test_file_replaced_by_symlink_to_identical_copy_is_refused(run, tmp_path):
    target = os.path.join(ckpt(run), TENSORS_FILE)
    copy = str(tmp_path / "copy.safetensors")
    shutil.move(target, copy)
    os.symlink(copy, target)
    assert only_problem(ckpt(run)).startswith(
        f"{target}: not a regular file (symlinks and devices are refused"
    )
    assert_falls_back(run)


def test_manifest_symlink_is_refused(run, tmp_path):
    target = os.path.join(ckpt(run), MANIFEST_FILE)
    copy = str(tmp_path / "manifest.json")
    shutil.move(target, copy)
    os.symlink(copy, target)
    msg = only_problem(ckpt(run))
    assert msg.startswith(f"{target}: not a regular file (symlinks and devices are refused"), msg
    assert_falls_back(run)


# ---------------------------------------------------------------- fall-back chains


def test_all_corrupt_means_no_checkpoint(run):
    for name in (STEP1, STEP2):
        flip(
            os.path.join(ckpt(run, name), TENSORS_FILE),
            os.path.getsize(os.path.join(ckpt(run, name), TENSORS_FILE)) - 1,
        )
    assert newest_valid(run) is None
    assert [i.valid for i in list_checkpoints(run, verify=True)] == [False, False]


def test_set_aside_keeps_the_corrupt_checkpoint_and_resume_uses_the_previous(run):
    flip(os.path.join(ckpt(run), TENSORS_FILE), 100)
    bad = newest_valid(run)
    assert bad.name == STEP1
    dest = set_aside(run, STEP2, "hash mismatch")
    assert os.path.dirname(dest) == os.path.join(run, SET_ASIDE_DIR)
    assert os.path.exists(os.path.join(dest, TENSORS_FILE))  # kept, never deleted
    assert [i.name for i in list_checkpoints(run)] == [STEP1]
    assert_falls_back(run)
