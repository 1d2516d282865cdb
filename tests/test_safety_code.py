"""mergesmith never runs code that came with a model or lies in the working directory, and an interrupted merge
never resumes over changed inputs. Real processes, hostile folders that leave a marker file when their code runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import SEED_RECIPE
from mergesmith.cli import main

THIRD_PARTY = [
    "torch",
    "click",
    "yaml",
    "transformers",
    "safetensors",
    "numpy",
    "tqdm",
    "huggingface_hub",
    "tokenizers",
    "pydantic",
]
COMMAND = Path(sys.executable).parent / "mergesmith"  # the console script of the environment running the tests


def hostile_dir(root: Path, modules) -> Path:
    """A folder whose modules, if imported, leave `pwned-NAME` next to it and stop the process."""
    d = root / "hostile"
    d.mkdir(exist_ok=True)
    for m in modules:
        (d / f"{m}.py").write_text(f"open({str(root / ('pwned-' + m))!r}, 'w').close()\nraise SystemExit(97)\n")
    return d


def pwned(root: Path):
    return sorted(p.name for p in root.glob("pwned-*"))


def env(**extra):
    """The test environment without allocator variables and PYTHONPATH."""
    e = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "MERGESMITH_MALLOC", "PYTHONPATH")}
    e.update(extra)
    return e


def della_recipe(tmp_path, fam) -> Path:
    b, f1, f2, f3 = fam
    p = tmp_path / "r.yml"
    p.write_text(SEED_RECIPE.format(base=b, ft1=f1, ft2=f2, ft3=f3))
    return p


def ships_code(folder: Path, marker: Path) -> Path:
    """Make `folder` ask transformers for its own classes (a model type transformers does not know, auto_map in
    config.json and tokenizer_config.json), with Python files that leave `marker` when imported."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evilmistral"
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizerFast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import MistralConfig, MistralForCausalLM\n"
        "class EvilConfig(MistralConfig):\n    model_type = 'evilmistral'\n"
        "class EvilModel(MistralForCausalLM):\n    config_class = EvilConfig\n"
    )
    (folder / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizerFast\n"
    )
    return folder


# -- code in the working directory ---------------------------------------------------------------------------------


@pytest.mark.skipif(
    not COMMAND.exists() or not sys.platform.startswith("linux"), reason="needs the installed console script and /proc"
)
def test_command_never_restarts_nor_imports_the_working_directory(tmp_path, fam):
    """`mergesmith run` of a row-block method tunes the allocator in its own process: it never execs another
    interpreter, and takes no torch.py or mergesmith.py from the working directory."""
    r = della_recipe(tmp_path, fam)
    cwd = hostile_dir(tmp_path, THIRD_PARTY + ["mergesmith", "json", "tempfile"])
    out = tmp_path / "o"
    args = ["run", str(r), str(out), "--seed", "3", "--quiet"]
    p = subprocess.Popen(
        [str(COMMAND), *args],
        cwd=cwd,
        env=env(MERGESMITH_TEST_TENSOR_DELAY="0.1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "o.partial" / ".mergesmith-journal").exists() and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert p.poll() is None, p.stderr.read()
    argv = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert p.wait(timeout=120) == 0, p.stderr.read()
    assert pwned(tmp_path) == []
    assert (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists()
    assert argv[1:2] == [str(COMMAND).encode()] and [a.decode() for a in argv[2:]] == args  # the script itself


def test_python_m_mergesmith_drops_the_working_directory(tmp_path, fam):
    """`python -m` puts the working directory first on the path; a torch.py or click.py there is never imported
    (a restarted merge and the process itself). A mergesmith.py there is Python's business: see __main__.py."""
    r = della_recipe(tmp_path, fam)
    cwd = hostile_dir(tmp_path, THIRD_PARTY)
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(r), str(tmp_path / "o"), "--seed", "3", "--quiet"],
        cwd=cwd,
        env=env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert pwned(tmp_path) == []


# -- code shipped with a model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [None, "y\n"])
def test_eval_refuses_a_model_that_ships_code_without_asking(tmp_path, fam, answer):
    """transformers would ask "run the custom code? [y/N]" and, on y, import the folder's modeling file."""
    model = ships_code(Path(shutil.copytree(fam[1], tmp_path / "m")), tmp_path / "pwned-model-code")
    cwd = hostile_dir(tmp_path, THIRD_PARTY)
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith", "eval", str(model)],
        cwd=cwd,
        env=env(),
        input=answer,
        stdin=subprocess.DEVNULL if answer is None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.splitlines() == [
        f"error: {model / 'config.json'}: 'auto_map' asks to run Python code shipped with the model; mergesmith "
        "never runs model code, so `eval` cannot load it (merging its weights still works)"
    ]
    assert pwned(tmp_path) == []


def test_merging_a_model_that_ships_code_reads_weights_config_and_tokenizer_only(tmp_path, fam, monkeypatch):
    """The union vocabulary loads every model's tokenizer with transformers; answering y to a prompt (which older
    code let transformers show) must not matter: no prompt, no code, and the merge works."""
    b, f1 = fam[0], ships_code(Path(shutil.copytree(fam[1], tmp_path / "m")), tmp_path / "pwned-model-code")
    r = tmp_path / "u.yml"
    r.write_text(
        f"models:\n  - model: {b}\n  - model: {f1}\nmerge_method: linear\nparameters:\n  weight: 0.5\n"
        "tokenizer_source: union\ndtype: float32\n"
    )
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(r), str(tmp_path / "u"), "--quiet"],
        cwd=tmp_path,
        env=env(),
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "custom code" not in p.stdout + p.stderr
    assert (tmp_path / "u" / "tokenizer.json").exists()
    plain = tmp_path / "plain.yml"
    plain.write_text(r.read_text().replace("tokenizer_source: union\n", ""))
    with pytest.raises(SystemExit) as e:
        main(["run", str(plain), str(tmp_path / "p"), "--quiet"])
    assert e.value.code == 0
    assert pwned(tmp_path) == []


# -- resume over changed inputs -------------------------------------------------------------------------------------


def interrupted(r: Path, out: Path, cwd: Path, after: int = 3) -> None:
    """Start `mergesmith run` slowly and SIGKILL it once `after` tensors are journaled."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mergesmith",
            "run",
            str(r),
            str(out),
            "--quiet",
            "--seed",
            "5",
            "--out-shard-size",
            "60KB",
        ],
        cwd=cwd,
        env=env(MERGESMITH_TEST_TENSOR_DELAY="0.1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    j = out.parent / (out.name + ".partial") / ".mergesmith-journal"
    deadline = time.monotonic() + 60
    while (not j.exists() or len(j.read_text().splitlines()) <= after) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert j.exists() and not out.exists()


def rerun(r: Path, out: Path, *extra) -> int:
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(out), "--quiet", "--seed", "5", "--out-shard-size", "60KB", *extra])
    return e.value.code


def own_family(tmp_path, fam):
    """A copy of the shared family, so this test may change its files."""
    return [Path(shutil.copytree(f, tmp_path / "fam" / f.name)) for f in fam]


def rewrite_keeping_mtime(f: Path) -> None:
    """Change one stored value (the lowest mantissa bit of the file's last bf16 element) in place, same size, and
    put the access and modification times back to the nanosecond."""
    st = os.stat(f)
    data = bytearray(f.read_bytes())
    data[-2] ^= 1
    time.sleep(0.05)  # past the clock tick of the file's creation, as any real edit is
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns and os.stat(f).st_size == st.st_size


def test_resume_refuses_weights_rewritten_with_their_mtime_put_back(tmp_path, fam, capsys):
    fam = own_family(tmp_path, fam)
    r = della_recipe(tmp_path, fam)
    out = tmp_path / "o"
    interrupted(r, out, tmp_path)
    weights = sorted(fam[2].glob("*.safetensors"))[-1]
    rewrite_keeping_mtime(weights)
    assert rerun(r, out) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning: ")]
    assert len(err) == 1 and "holds an interrupted merge that differs from this one" in err[0]
    assert f"input {fam[2]}: {weights.name}" in err[0] and "--restart" in err[0]
    assert not out.exists()
    assert rerun(r, out, "--restart") == 0


def test_resume_refuses_a_changed_tokenizer_of_a_union_merge(tmp_path, fam, capsys):
    """Two ordinary tokens of one input swap ids: same vocabulary size and tensor shapes, but that input's rows go
    to other places of the union vocabulary; the rows merged before the change would not match the rest."""
    fam = own_family(tmp_path, fam)
    r = tmp_path / "u.yml"
    r.write_text(
        f"models:\n  - model: {fam[0]}\n  - model: {fam[1]}\n    parameters:\n      weight: 0.3\n"
        f"merge_method: task_arithmetic\nbase_model: {fam[0]}\nparameters:\n  weight: 0.5\n"
        "tokenizer_source: union\ndtype: float32\n"
    )
    out = tmp_path / "o"
    interrupted(r, out, tmp_path)
    tj = fam[1] / "tokenizer.json"
    tok = json.loads(tj.read_text())
    vocab = tok["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tj.write_text(json.dumps(tok))
    assert rerun(r, out) == 2
    err = capsys.readouterr().err
    assert f"(changed: input {fam[1]}: tokenizer.json)" in err
    assert rerun(r, out, "--restart") == 0


def test_fingerprint_of_large_files_sees_ctime_and_inode_and_small_files_by_content(tmp_path, fam, monkeypatch):
    """Large files are not read (stat only): a rewrite with the mtime put back still changes the ctime, and so does
    a copy with the same bytes and mtime put in place. Small files are compared by content: a touch is no change,
    an edit is."""
    import mergesmith.journal as journal
    from mergesmith.plan import make_plan
    from mergesmith.recipe import load_recipe

    fam = own_family(tmp_path, fam)
    r = della_recipe(tmp_path, fam)

    def fp():
        return journal.fingerprint(make_plan(load_recipe(str(r)), seed=1, recipe_dir=tmp_path))

    weights = sorted(fam[1].glob("*.safetensors"))[-1]
    cfg = fam[3] / "config.json"
    before = fp()
    os.utime(cfg, ns=(0, 0))
    assert journal.differences(before, fp()) == "nothing"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "note": "edited"}))
    assert journal.differences(before, fp()) == f"input {fam[3]}: config.json"

    monkeypatch.setattr(journal, "HASH_LIMIT", 0)  # every file counts as large
    before = fp()
    assert journal.differences(before, fp()) == "nothing"
    rewrite_keeping_mtime(weights)
    assert journal.differences(before, fp()) == f"input {fam[1]}: {weights.name}"
    before = fp()
    copy = weights.with_suffix(".copy")
    shutil.copy2(weights, copy)  # same bytes and mtime, another inode
    os.replace(copy, weights)
    assert journal.differences(before, fp()) == f"input {fam[1]}: {weights.name}"
