"""Interrupted merges resume to the same bytes; changed inputs refuse to resume."""

import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import SEED_RECIPE
from mergesmith.cli import main


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name != "config.json":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def recipe(tmp_path, fam):
    b, f1, f2, f3 = fam
    p = tmp_path / "r.yml"
    p.write_text(SEED_RECIPE.format(base=b, ft1=f1, ft2=f2, ft3=f3))
    return p


def start(r, out, *extra, delay="0.1"):
    env = dict(os.environ, MERGESMITH_TEST_TENSOR_DELAY=delay)
    return subprocess.Popen(
        [sys.executable, "-m", "mergesmith", "run", str(r), str(out), "--quiet", "--out-shard-size", "60KB", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def journal_lines(partial: Path) -> int:
    j = partial / ".mergesmith-journal"
    return len(j.read_text().splitlines()) - 1 if j.exists() else -1


@pytest.mark.parametrize("seed_args,kills", [(["--seed", "9"], 3), ([], 1)])
def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path, fam, seed_args, kills):
    r = recipe(tmp_path, fam)
    ref = tmp_path / "ref"
    p = start(r, ref, *seed_args, delay="0")
    assert p.wait() == 0, p.stderr.read()
    rng = random.Random(1234)
    for k in range(kills):
        out = tmp_path / f"o{k}"
        partial = tmp_path / f"o{k}.partial"
        p = start(r, out, *seed_args)
        # kill somewhere in the middle: after some tensors are journaled, before the end
        target = rng.randint(2, 15)
        deadline = time.monotonic() + 60
        while journal_lines(partial) < target and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.random() * 0.1)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not out.exists() and partial.exists()  # nothing that looks finished
        if not seed_args:  # the drawn seed is reused from the journal
            import json

            seed = json.loads((partial / ".mergesmith-journal").read_text().splitlines()[0])["seed"]
            ref = tmp_path / f"ref{k}"
            p0 = start(r, ref, "--seed", str(seed), delay="0")
            assert p0.wait() == 0
        p = start(r, out, *seed_args, delay="0")
        assert p.wait() == 0, p.stderr.read()
        assert not partial.exists()
        assert not (out / ".mergesmith-journal").exists()
        assert digest(out) == digest(ref), f"kill point {k}"


def test_changed_input_refuses_to_resume(tmp_path, fam, capsys):
    r = recipe(tmp_path, fam)
    out = tmp_path / "o"
    p = start(r, out, "--seed", "1")
    while journal_lines(tmp_path / "o.partial") < 3 and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r.write_text(r.read_text().replace("weight: 0.3", "weight: 0.35"))
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(out), "--seed", "1", "--quiet", "--out-shard-size", "60KB"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds an interrupted merge that differs from this one (changed: recipe)" in err
    assert "--restart" in err
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(out), "--seed", "1", "--quiet", "--out-shard-size", "60KB", "--restart"])
    assert e.value.code == 0
    assert (out / "model.safetensors.index.json").exists()


def test_corrupted_journaled_tensor_is_recomputed(tmp_path, fam):
    """A journaled tensor whose bytes do not match its CRC (torn write) is recomputed, not trusted."""
    r = recipe(tmp_path, fam)
    ref, out = tmp_path / "ref", tmp_path / "o"
    assert start(r, ref, "--seed", "4", delay="0").wait() == 0
    p = start(r, out, "--seed", "4")
    partial = tmp_path / "o.partial"
    while journal_lines(partial) < 6 and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    shard = sorted(partial.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-10:] = b"\xff" * 10  # clobber the end of the first shard's last journaled tensor's bytes
    shard.write_bytes(bytes(data))
    assert start(r, out, "--seed", "4", delay="0").wait() == 0
    assert digest(out) == digest(ref)


def test_disk_full_mid_merge_then_rerun_with_room(tmp_path, fam, monkeypatch, capsys):
    import errno

    import mergesmith.io.writer as w

    r = recipe(tmp_path, fam)
    ref, out = tmp_path / "ref", tmp_path / "o"
    with pytest.raises(SystemExit):
        main(["run", str(r), str(ref), "--seed", "2", "--quiet", "--out-shard-size", "60KB"])
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 8:  # the disk fills up after a few tensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(w.os, "pwrite", failing)
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(out), "--seed", "2", "--quiet", "--out-shard-size", "60KB"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: writing ") and "No space left on device (disk full?)" in err[-1]
    assert not out.exists() and (tmp_path / "o.partial" / ".mergesmith-journal").exists()
    monkeypatch.setattr(w.os, "pwrite", real)
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(out), "--seed", "2", "--quiet", "--out-shard-size", "60KB"])
    assert e.value.code == 0
    assert digest(out) == digest(ref)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_every_byte_written_is_sent_to_disk_as_it_is_written(tmp_path, fam, monkeypatch):
    """Each block's bytes go to the disk as they are written: its whole pages directly (O_DIRECT), its partial
    pages through the page cache and handed to the disk right after (sync_file_range, SYNC_FILE_RANGE_WRITE = 2).
    Together the ranges cover each shard's tensor data exactly, so the final fsync has little left."""
    import mergesmith.io.writer as w

    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 8192)
    fd = os.open(probe, os.O_RDWR)
    try:  # the binding itself, before the spy replaces it
        assert w._SYNC_FILE_RANGE(fd, 0, 8192, w.SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)
    asked = []

    def spy(fd, offset, n, flags):
        asked.append((os.fstat(fd).st_ino, offset, n, flags))
        return 0

    monkeypatch.setattr(w, "_SYNC_FILE_RANGE", spy)
    direct = w.ShardWriter._direct

    def direct_spy(self, shard, part, at, what):
        asked.append((os.fstat(self.fds[shard]).st_ino, at, len(part), "direct"))
        return direct(self, shard, part, at, what)

    monkeypatch.setattr(w.ShardWriter, "_direct", direct_spy)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe(tmp_path, fam)), str(out), "--seed", "2", "--quiet", "--out-shard-size", "60KB"])
    assert e.value.code == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and {flags for *_, flags in asked} <= {2, "direct"}
    for shard in shards:
        data = shard.read_bytes()
        start_of_data = 8 + struct.unpack("<Q", data[:8])[0]
        ranges = sorted((a, a + n) for ino, a, n, _ in asked if ino == shard.stat().st_ino)
        covered = start_of_data
        for a, z in ranges:
            assert a == covered  # no gap, no overlap
            covered = z
        assert covered == len(data)


def _direct_refused(monkeypatch, how):
    """os.pwrite on the writers' O_DIRECT descriptors answers `how` (EINVAL, as a file system without it does, or a
    short count); every other write goes through."""
    import errno

    import mergesmith.io.writer as w

    real, opened = os.pwrite, []
    open_direct = w._open_direct

    def tracked(path):
        fd = open_direct(path)
        opened.append(fd)
        return fd

    def pwrite(fd, data, offset):
        if fd in opened:
            if how == "einval":
                raise OSError(errno.EINVAL, "Invalid argument")
            return 100  # a short write: the rest goes through the page cache
        return real(fd, data, offset)

    monkeypatch.setattr(w, "_open_direct", tracked)
    monkeypatch.setattr(w.os, "pwrite", pwrite)
    return opened


@pytest.mark.parametrize("how", [None, "einval", "short"])
def test_direct_writes_give_the_page_cache_bytes(tmp_path, fam, monkeypatch, how):
    """Whole pages written around the page cache (O_DIRECT), or through it where the file system refuses them
    or writes short: the same bytes as writing everything through the page cache."""
    import mergesmith.io.writer as w

    r, ref, out = recipe(tmp_path, fam), tmp_path / "ref", tmp_path / "o"
    args = ["--seed", "2", "--quiet", "--out-shard-size", "60KB"]
    with monkeypatch.context() as m:
        m.setattr(w, "_open_direct", lambda path: None)
        with pytest.raises(SystemExit):
            main(["run", str(r), str(ref), *args])
    if how is None:
        written = []
        direct = w.ShardWriter._direct
        monkeypatch.setattr(w.ShardWriter, "_direct", lambda self, *a: written.append(a[2]) or direct(self, *a))
        probe = tmp_path / "probe"
        probe.write_bytes(b"")
        fd = w._open_direct(probe)
        if fd is None:
            pytest.skip("no O_DIRECT on this file system")
        os.close(fd)
    else:
        opened = _direct_refused(monkeypatch, how)
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(out), *args])
    assert e.value.code == 0 and digest(out) == digest(ref)
    assert (len(written) > 5) if how is None else any(fd is not None for fd in opened)
