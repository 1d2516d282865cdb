"""The output folder: never an input, never a folder mergesmith did not write, one run at a time, and a finished
folder whose every tensor `mergesmith verify` can check."""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections import namedtuple
from pathlib import Path

import pytest

from helpers import make_mistral, run_recipe
from mergesmith.cli import main

RECIPE = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
dtype: bfloat16
"""


def write_recipe(path: Path, base, ft1, ft2) -> Path:
    path.write_text(RECIPE.format(base=base, ft1=ft1, ft2=ft2))
    return path


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def error_line(capsys) -> str:
    """The one `error:` line of the last command (there must be exactly one)."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("error:", "internal error:"))]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shard_digest(folder: Path) -> list:
    return [(f.name, f.read_bytes()) for f in sorted(folder.glob("*.safetensors"))]


def copied_family(fam, root: Path) -> dict:
    """Copies of the test family's base and two fine-tunes under root/ (tests here may try to destroy them)."""
    root.mkdir()
    return {n: Path(shutil.copytree(p, root / n)) for n, p in zip(("base", "ft1", "ft2"), fam)}


def tensor_spans(shard: Path) -> dict:
    """{name: (start, end)} absolute byte ranges of each tensor's data, from the safetensors layout itself."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return {
        k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


# --------------------------------------------------------------------------------------------- one at a time


def test_a_second_run_on_the_same_output_is_refused_while_the_first_finishes(tmp_path, fam, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    run_recipe(str(r), str(tmp_path / "ref"), seed=3)
    out = tmp_path / "o"
    env = dict(os.environ, MERGESMITH_TEST_TENSOR_DELAY="1.0")  # 21 tensors, two at a time: about 10 s
    first = subprocess.Popen(
        [sys.executable, "-m", "mergesmith", "run", str(r), str(out), "--seed", "3", "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = tmp_path / "o.partial" / ".mergesmith-journal"
    deadline = time.monotonic() + 90
    while (
        not (journal.exists() and len(journal.read_text().splitlines()) > 1)
        and first.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(r), str(out), "--seed", "3", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli("run", r, out, "--seed", 3, "--quiet", "--overwrite", "--restart") == 2  # nor with force
    assert first.poll() is None, "the first run ended before the second was tried; the test proves nothing"
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith(("error", "internal"))]
    assert second.returncode == 2 and len(errors) == 1 and f"PID {first.pid}" in errors[0], second.stderr
    assert f"PID {first.pid}" in error_line(capsys)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert shard_digest(out) == shard_digest(tmp_path / "ref")
    assert cli("verify", out, "--no-load") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "r.yml", "ref"]  # no lock file left behind


# --------------------------------------------------------------------------------------------- inputs stay


@pytest.mark.parametrize(
    "case",
    [
        "is an input",
        "holds the inputs",
        "inside an input",
        "input via a symlink",
        "holds the recipe",
        "is an input mergesmith wrote",
    ],
)
def test_an_output_overlapping_an_input_is_refused_and_the_inputs_stay(tmp_path, fam, case, capsys):
    m = copied_family(fam, tmp_path / "models")
    if case == "is an input mergesmith wrote":  # an earlier merge merged into itself: --overwrite may not apply
        run_recipe(str(write_recipe(tmp_path / "first.yml", *fam[:3])), str(tmp_path / "models" / "merged"), seed=1)
        m["ft1"] = tmp_path / "models" / "merged"
    ft1 = m["ft1"]
    if case == "input via a symlink":
        (tmp_path / "link").symlink_to(ft1)
        ft1 = tmp_path / "link"
    work = tmp_path / "work"
    work.mkdir()
    r = write_recipe(work / "r.yml", m["base"], ft1, m["ft2"])
    out = {
        "is an input": m["ft1"],
        "is an input mergesmith wrote": m["ft1"],
        "holds the inputs": tmp_path / "models",
        "inside an input": m["ft1"] / "merged",
        "input via a symlink": m["ft1"],
        "holds the recipe": work,
    }[case]
    before = snapshot(tmp_path)
    assert cli("run", r, out, "--overwrite", "--quiet") == 2
    line = error_line(capsys)
    assert str(out) in line or str(out.name) in line
    assert snapshot(tmp_path) == before


def test_an_output_next_to_the_recipe_is_fine(tmp_path, fam):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    assert cli("run", r, tmp_path / "out", "--quiet") == 0
    assert cli("run", r, tmp_path / "out", "--quiet", "--overwrite") == 0


@pytest.mark.parametrize("which", ["--model", "--base"])
def test_extract_lora_never_writes_over_its_inputs(tmp_path, fam, which, capsys):
    m = copied_family(fam, tmp_path / "models")
    merged = tmp_path / "models" / "merged"  # one of ours: only its being an input keeps --overwrite off it
    run_recipe(str(write_recipe(tmp_path / "r.yml", *fam[:3])), str(merged), seed=1)
    before = snapshot(tmp_path)
    out = merged if which == "--model" else m["base"]
    assert cli("extract-lora", out, "--model", merged, "--base", m["base"], "--rank", 2, "--overwrite") == 2
    assert which in error_line(capsys)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------- only our own folders


def test_overwrite_refuses_a_folder_mergesmith_did_not_write(tmp_path, fam, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli("run", r, out, "--quiet", "--overwrite") == 2
    assert "remove it yourself or choose another OUT_DIR" in error_line(capsys)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # an empty folder may be filled
    assert cli("run", r, out, "--quiet", "--seed", 1) == 0
    assert cli("run", r, out, "--quiet", "--seed", 2, "--overwrite") == 0  # and our own output replaced
    assert "# seed: 2" in (out / "mergesmith_config.yml").read_text()


@pytest.mark.parametrize("name,flags", [("o.old", ["--overwrite"]), ("o.partial", []), ("o.partial", ["--overwrite"])])
def test_user_folders_named_like_working_folders_are_never_deleted(tmp_path, fam, name, flags, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    out = tmp_path / "o"
    if "--overwrite" in flags:
        assert cli("run", r, out, "--quiet") == 0
    mine = tmp_path / name
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    assert cli("run", r, out, "--quiet", *flags) == 2
    assert name in error_line(capsys)
    assert snapshot(tmp_path) == before


def test_extract_lora_replaces_its_own_adapter_but_not_a_user_folder(tmp_path, fam, capsys):
    out = tmp_path / "adapter"
    args = ["--model", fam[1], "--base", fam[0], "--rank", 2]
    assert cli("extract-lora", out, *args) == 0
    assert cli("extract-lora", out, *args, "--rank", 3, "--overwrite") == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert cli("extract-lora", user, *args, "--overwrite") == 2
    error_line(capsys)
    assert (user / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["symlink", ".", ".."])
def test_a_symlink_or_dot_output_is_a_one_line_refusal(tmp_path, fam, case, monkeypatch, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    target = tmp_path / "target"
    assert cli("run", r, target, "--quiet") == 0  # even one of ours is not replaced through a link
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path)
    out = tmp_path / "link" if case == "symlink" else case
    assert cli("run", r, out, "--quiet", "--overwrite") == 2
    error_line(capsys)
    assert snapshot(tmp_path) == before and (tmp_path / "link").is_symlink()


# ------------------------------------------------------------------------------------------- free space


def test_the_free_space_check_counts_every_file_written(tmp_path, fam, monkeypatch, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    ref = tmp_path / "ref"
    assert cli("run", r, ref, "--quiet", "--seed", 1) == 0
    written = sum(f.stat().st_size for f in ref.iterdir())
    assert written > sum(f.stat().st_size for f in ref.glob("*.safetensors")) + 10_000  # tokenizer, card, ...
    Usage = namedtuple("Usage", "total used free")
    free = {"n": written - 1}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, free["n"]))
    assert cli("run", r, tmp_path / "o", "--quiet", "--seed", 1) == 2
    assert "not enough free disk" in error_line(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    free["n"] = 2 * written + 2 * 2**20  # room for everything, twice, and a margin
    assert cli("run", r, tmp_path / "o", "--quiet", "--seed", 1) == 0


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("n", [-3, 0])
def test_threads_below_one_is_a_one_line_refusal(tmp_path, fam, n, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    assert cli("run", r, tmp_path / "o", "--quiet", "--threads", n) == 2
    assert "--threads" in error_line(capsys)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- verify


def test_checksums_list_every_tensor_and_verify_finds_a_flipped_bit(tmp_path, fam, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    out = tmp_path / "o"
    assert cli("run", r, out, "--quiet", "--out-shard-size", "60KB") == 0
    listed = json.loads((out / "mergesmith_checksums.json").read_text())["tensors"]
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    mine = {}
    for shard in shards:
        data = shard.read_bytes()
        for name, (a, b) in tensor_spans(shard).items():
            mine[name] = {"file": shard.name, "crc32": zlib.crc32(data[a:b])}
    assert listed == mine and len(mine) == 21
    assert cli("verify", out, "--no-load") == 0
    shard = shards[1]
    name, (a, b) = sorted(tensor_spans(shard).items())[0]
    data = bytearray(shard.read_bytes())
    data[a] ^= 1  # the lowest mantissa bit of a bfloat16: still finite, still plausible
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli("verify", out, "--no-load") == 2
    assert name in error_line(capsys)


def test_verify_flags_a_tensor_left_all_zeros(tmp_path, fam, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    out = tmp_path / "o"
    assert cli("run", r, out, "--quiet") == 0
    shard = out / "model.safetensors"
    name = "model.layers.1.mlp.up_proj.weight"
    a, b = tensor_spans(shard)[name]
    data = bytearray(shard.read_bytes())
    data[a:b] = bytes(b - a)  # never written: what a lost write leaves in a preallocated shard
    shard.write_bytes(bytes(data))
    (out / "mergesmith_checksums.json").unlink()  # so that the zero check is what finds it
    capsys.readouterr()
    assert cli("verify", out, "--no-load") == 2
    line = error_line(capsys)
    assert name in line and "all zeros" in line
    (out / "mergesmith_config.yml").unlink()  # inputs unknown: a warning only
    assert cli("verify", out, "--no-load") == 0
    assert any(ln.startswith("warning") and name in ln for ln in capsys.readouterr().out.splitlines())


def test_a_tensor_zero_in_every_input_passes_verify(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.mlp.down_proj.weight"
    for i, m in enumerate(("a", "b")):
        make_mistral(tmp_path / m, seed=i, layers=1, tokenizer=False)
        sd = load_file(str(tmp_path / m / "model.safetensors"))
        sd[name].zero_()
        save_file(sd, str(tmp_path / m / "model.safetensors"), metadata={"format": "pt"})
    r = tmp_path / "r.yml"
    r.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n"
    )
    assert cli("run", r, tmp_path / "o", "--quiet") == 0
    capsys.readouterr()
    assert cli("verify", tmp_path / "o", "--no-load") == 0
    assert "1 all-zero tensor(s) are all zeros in every input too" in capsys.readouterr().out


def verify_in_a_process(folder: Path) -> str:
    """`mergesmith verify` in a child process (a hang fails the test instead of stalling it); its one error."""
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith", "verify", str(folder), "--no-load"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith(("error", "internal"))]
    assert p.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), p.stderr
    return errors[0]


def test_verify_reads_only_regular_files_inside_the_folder(tmp_path, fam, capsys):
    folder = tmp_path / "v"
    (folder / "shards").mkdir(parents=True)
    os.mkfifo(folder / "shards" / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "shards/model-00001-of-00001.safetensors"}})
    )
    assert "model-00001-of-00001.safetensors" in verify_in_a_process(folder)
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    out = tmp_path / "o"
    assert cli("run", r, out, "--quiet") == 0
    (out / "tokenizer_config.json").unlink()
    os.mkfifo(out / "tokenizer_config.json")  # transformers would wait on it forever
    assert "tokenizer_config.json" in verify_in_a_process(out)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../outside/model.safetensors"}})
    )
    shutil.copytree(fam[0], tmp_path / "outside")
    assert cli("verify", folder, "--no-load") == 2
    assert "not a file name inside the model folder" in error_line(capsys)


def test_verify_refuses_a_folder_that_asks_to_run_its_code(tmp_path, fam, capsys):
    r = write_recipe(tmp_path / "r.yml", *fam[:3])
    out = tmp_path / "o"
    assert cli("run", r, out, "--quiet") == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "configuration_evil.py").write_text("raise SystemExit('ran model code')\n")
    assert cli("verify", out, "--no-load") == 2
    assert "auto_map" in error_line(capsys)
