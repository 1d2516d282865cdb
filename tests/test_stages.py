"""Multi-stage recipes (mergekit-multi's files of several YAML documents): the stages run in dependency order, each
into its own folder; the output equals merging the stages one by one; bad files are refused before any work; a
rerun continues an interrupted pipeline to the same bytes."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mergesmith
from mergesmith.cli import main
from mergesmith.demo import tiny_dir

T = tiny_dir()

# stage documents, in dependency order; the output stage uses both earlier ones
FIRST = f"""name: first
merge_method: linear
models:
  - model: {T / "sort"}
    parameters: {{weight: 0.5}}
  - model: {T / "reverse"}
    parameters: {{weight: 0.5}}
dtype: bfloat16
"""
SECOND = f"""name: second
merge_method: dare_ties
base_model: {T / "base"}
models:
  - model: first
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {T / "addition"}
    parameters: {{weight: 0.4, density: 0.5}}
dtype: bfloat16
"""
OUTPUT = """merge_method: slerp
base_model: first
models:
  - model: first
  - model: second
parameters: {t: 0.3}
dtype: bfloat16
"""


def write(tmp_path: Path, *docs: str, name: str = "p.yml") -> Path:
    p = tmp_path / name
    p.write_text("---\n".join(docs))
    return p


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def tensors(folder: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(folder.glob("*.safetensors")))


def recorded_seed(folder: Path) -> int:
    return int(re.search(r"^# seed: (\d+)", (folder / "mergesmith_config.yml").read_text(), re.M).group(1))


def test_stages_equal_merging_them_one_by_one(tmp_path, capsys):
    p = write(tmp_path, FIRST, SECOND, OUTPUT)
    out = tmp_path / "out"
    assert cli("run", p, out, "--seed", 5, "--quiet") == 0
    work = tmp_path / "out.stages"
    assert (work / "first" / "model.safetensors").exists() and (work / "second" / "model.safetensors").exists()
    # by hand: each stage a recipe of its own, the earlier outputs as its models (the random stage with the seed
    # its folder records)
    hand = tmp_path / "hand"
    hand.mkdir()
    a, b, c = hand / "a", hand / "b", hand / "c"
    assert cli("run", write(hand, FIRST.replace("name: first\n", ""), name="1.yml"), a, "--quiet") == 0
    text2 = SECOND.replace("name: second\n", "").replace("model: first", f"model: {a}")
    assert cli("run", write(hand, text2, name="2.yml"), b, "--seed", recorded_seed(work / "second"), "--quiet") == 0
    text3 = OUTPUT.replace("model: first", f"model: {a}").replace("base_model: first", f"base_model: {a}")
    assert cli("run", write(hand, text3.replace("model: second", f"model: {b}"), name="3.yml"), c, "--quiet") == 0
    assert tensors(work / "first") == tensors(a)
    assert tensors(work / "second") == tensors(b)
    assert tensors(out) == tensors(c)
    card = (out / "README.md").read_text()
    assert "name: first" in card and "name: second" in card and "merge_method: dare_ties" in card


def test_the_api_runs_a_multi_stage_file_and_plan_shows_the_stages(tmp_path, capsys):
    # documents out of dependency order: the output first, `first` last
    p = write(tmp_path, OUTPUT, SECOND, FIRST)
    assert cli("plan", p) == 0
    shown = capsys.readouterr().out
    order = re.findall(r"^  \d\. (\w+) \(line (\d+)", shown, re.M)
    assert order == [("first", "19"), ("second", "9"), ("output", "1")]
    assert "stage first:\n  recipe: p.yml" in shown and "stage second: planned when first is merged" in shown
    res = mergesmith.merge(p, tmp_path / "out", mergesmith.MergeOptions(seed=1, progress=False))
    assert res.path == tmp_path / "out" and res.plan.method.name == "slerp"
    assert (tmp_path / "out.stages" / "second" / "model.safetensors").exists()


CYCLE_A = "name: a\nmerge_method: linear\nmodels:\n  - model: b\n  - model: {t}\n"
CYCLE_B = "name: b\nmerge_method: linear\nmodels:\n  - model: {t}\n  - model: a\n"
OUT_A = "merge_method: linear\nmodels:\n  - model: a\n"
REFUSED = [
    (
        [CYCLE_A, CYCLE_B, OUT_A],
        r"p\.yml:11: the stages use each other in a cycle: a \(line 1\) -> b \(line 7\) "
        r"-> a \(line 1\); a stage may use only stages that do not use it",
    ),
    (
        ["name: a\nmerge_method: linear\nmodels:\n  - model: a\n", OUT_A],
        r"p\.yml:4: the stages use each other in a cycle: a \(line 1\) -> a \(line 1\)",
    ),
    (
        [FIRST, FIRST.replace("linear", "slerp")],
        r"p\.yml:10: stage name 'first' is given twice \(lines 1 and 10\); give each stage its own name",
    ),
    (
        [FIRST, SECOND.replace("model: first", "model: frist")],
        r"p\.yml:14: model 'frist' is neither a stage of this file \(first, second\) nor a folder "
        r"\(did you mean 'first'\?\)",
    ),
    ([FIRST, OUTPUT, OUTPUT], r"p\.yml:18: the documents at lines 10 and 18 both lack 'name:'"),
    (
        [FIRST.replace("name: first", "name: ../up"), OUTPUT],
        r"p\.yml:1: stage name '\.\./up' must be a plain "
        r"folder name",
    ),
    (
        [
            "name: a\nmerge_method: linear\nmodels:\n  - model: last\n",
            "name: last\nmerge_method: linear\nmodels:\n  - model: {t}\n",
        ],
        r"p\.yml:4: stage a uses last, the output stage",
    ),
]


@pytest.mark.parametrize(
    "docs,match", REFUSED, ids=["cycle", "self", "duplicate", "unknown", "two-unnamed", "bad-name", "uses-output"]
)
def test_bad_stage_files_are_refused_before_any_work(docs, match, tmp_path, capsys):
    p = write(tmp_path, *(d.replace("{t}", str(T / "base")) for d in docs))
    for cmd in (["plan", p], ["run", p, tmp_path / "out"]):
        assert cli(*cmd) == 2
        err = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("warning:")]
        assert len(err) == 1 and re.search("^error: " + match, err[0]), err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.yml"]


def digests(root: Path) -> dict:
    out = {}
    for folder in (root / "out.stages" / "first", root / "out.stages" / "second", root / "out"):
        h = hashlib.sha256()
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".json") and f.name != "config.json":
                h.update(f.name.encode() + f.read_bytes())
        out[folder.name] = h.hexdigest()
    return out


def start(p: Path, out: Path, *extra, delay: str):
    env = dict(os.environ, MERGESMITH_TEST_TENSOR_DELAY=delay)
    return subprocess.Popen(
        [sys.executable, "-m", "mergesmith", "run", str(p), str(out), "--quiet", "--out-shard-size", "1M", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def journal_lines(partial: Path) -> int:
    j = partial / ".mergesmith-journal"
    return len(j.read_text().splitlines()) - 1 if j.exists() else -1


def test_killed_pipeline_continues_to_the_same_bytes(tmp_path):
    """Killed while merging the second stage, with no --seed: the rerun skips the first stage (its files are not
    written again), continues the second from its journal, with the seed the first run drew."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    run.mkdir(), ref.mkdir()
    p = write(run, FIRST, SECOND, OUTPUT)
    proc = start(p, run / "out", delay="0.05")
    partial = run / "out.stages" / "second.partial"
    deadline = time.monotonic() + 60
    while journal_lines(partial) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = run / "out.stages" / "first" / "model-00001-of-00005.safetensors"
    assert first.exists() and partial.exists() and not (run / "out").exists()
    stamp = first.stat().st_mtime_ns
    proc = start(p, run / "out", delay="0")
    assert proc.wait() == 0, proc.stderr.read()
    assert first.stat().st_mtime_ns == stamp and not partial.exists()
    seed = json.loads((run / "out.stages" / "mergesmith_pipeline.json").read_text())["seed"]
    proc = start(write(ref, FIRST, SECOND, OUTPUT), ref / "out", "--seed", str(seed), delay="0")
    assert proc.wait() == 0, proc.stderr.read()
    assert digests(run) == digests(ref)


def test_a_changed_stage_is_merged_again_with_what_uses_it(tmp_path, capsys):
    p = write(tmp_path, FIRST, SECOND, OUTPUT)
    out = tmp_path / "out"
    assert cli("run", p, out, "--seed", 2, "--quiet") == 0
    before = digests(tmp_path)
    stamp = (tmp_path / "out.stages" / "first" / "model.safetensors").stat().st_mtime_ns
    p.write_text(p.read_text().replace("weight: 0.6", "weight: 0.7"))
    assert cli("run", p, out, "--seed", 2, "--quiet") == 2  # the output is replaced only with --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli("run", p, out, "--seed", 2, "--quiet", "--overwrite") == 0
    after = digests(tmp_path)
    assert (tmp_path / "out.stages" / "first" / "model.safetensors").stat().st_mtime_ns == stamp
    assert after["first"] == before["first"]
    assert after["second"] != before["second"] and after["out"] != before["out"]
    assert cli("run", p, out, "--seed", 2, "--quiet", "--overwrite", "--no-lazy") == 0  # every stage again
    assert (tmp_path / "out.stages" / "first" / "model.safetensors").stat().st_mtime_ns != stamp
    assert digests(tmp_path) == after


def test_a_single_recipe_with_a_stray_document_marker_says_what_to_do(tmp_path, capsys):
    p = write(tmp_path, FIRST.replace("name: first\n", ""), "")
    assert cli("plan", p) == 2
    assert capsys.readouterr().err.strip() == (
        "error: p.yml:8:1: a second YAML document (after a '---' line) in a single recipe: remove that line, or "
        "give each document a name: (a multi-stage recipe, which `mergesmith run` and `mergesmith plan` take)"
    )


def test_intermediate_dir_and_folders_that_are_not_ours(tmp_path, capsys):
    p = write(tmp_path, FIRST, OUTPUT.replace("model: second", f"model: {T / 'base'}"))
    work = tmp_path / "work"
    assert cli("run", p, tmp_path / "out", "-I", work, "--quiet") == 0
    assert (work / "first" / "model.safetensors").exists() and not (tmp_path / "out.stages").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert cli("run", p, tmp_path / "out2", "--intermediate-dir", mine, "--quiet") == 2
    assert "holds files mergesmith did not write" in capsys.readouterr().err
    assert sorted(x.name for x in mine.iterdir()) == ["notes.txt"]
