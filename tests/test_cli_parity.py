"""`mergesmith run` takes mergekit-yaml 0.1.5's command lines: every option, its `--no-` form, its meaning and its
units. The table below says what mergesmith does with each; tests/data/mergekit-yaml-0.1.5-help.txt is
`mergekit-yaml --help` of that version, and the table must cover every option it names."""

import re
import types
from pathlib import Path

import pytest
import torch

from helpers import make_mistral, read_folder
from mergesmith.cli import main
from mergesmith.demo import tiny_dir

HELP = Path(__file__).parent / "data" / "mergekit-yaml-0.1.5-help.txt"

# (arguments, the MergeOptions values they give, the one-line note they print or None for none)
# Options that only say how mergekit works (its lazy unpickler, its executors, its writer threads) change nothing
# here: mergesmith streams row blocks from the files, writes safetensors in place as each tensor is done, and
# applies LoRA adapters in float32 while reading.
TABLE = [
    (["--allow-crimes"], {"allow_crimes": True}, None),
    (["--no-allow-crimes"], {"allow_crimes": False}, None),
    (["--unsafe-truncate-embeddings"], {"unsafe_truncate_embeddings": True}, None),
    (["--no-unsafe-truncate-embeddings"], {"unsafe_truncate_embeddings": False}, None),
    (
        ["--trust-remote-code"],
        {},
        "--trust-remote-code changes nothing: mergesmith never runs code that comes with a model",
    ),
    (["--no-trust-remote-code"], {}, None),
    (["--transformers-cache", "hf-cache"], {}, "set HF_HUB_CACHE to that folder instead"),
    (["--lora-merge-cache", "lora-cache"], {}, None),
    (["--lora-merge-dtype", "bfloat16"], {}, None),
    (["--random-seed", "7"], {"seed": 7}, None),
    (["-v"], {}, None),
    (["-vv"], {}, None),
    (["--quiet"], {"progress": False}, None),
    (["--no-quiet"], {"progress": True}, None),
    (["--cuda"], {"device": "cuda"}, None),
    (["--no-cuda"], {"device": "cpu"}, None),
    (["--device", "auto"], {"device": "auto"}, None),
    (["--cuda", "--device", "cpu"], {"device": "cpu"}, None),  # mergekit: --device wins over --cuda
    (["--low-cpu-memory"], {}, None),
    (["--no-low-cpu-memory"], {}, None),
    (["--lazy-unpickle"], {}, None),
    (["--no-lazy-unpickle"], {}, None),
    (["--read-to-gpu"], {}, None),
    (["--no-read-to-gpu"], {}, None),
    (["--multi-gpu"], {"device": "cuda"}, None),  # one GPU: mergesmith computes on one device
    (["--no-multi-gpu"], {"device": "cpu"}, None),
    (["-j", "3"], {"threads": 3}, None),
    (["--num-threads", "3"], {"threads": 3}, None),
    (["--gpu-rich"], {"device": "cuda"}, None),
    (["--async-write"], {}, None),
    (["--no-async-write"], {}, None),
    (["--write-threads", "4"], {}, None),
    ([], {"shard_bytes": 5 * 10**9, "device": "cpu", "copy_tokenizer": True, "write_model_card": True}, None),
    (["--out-shard-size", "1B"], {"shard_bytes": 10**9}, None),  # mergekit's count: a billion, not a byte
    (["--out-shard-size", "500M"], {"shard_bytes": 5 * 10**8}, None),
    (["--out-shard-size", "100K"], {"shard_bytes": 10**5}, None),
    (["--out-shard-size", "2GB"], {"shard_bytes": 2 * 10**9}, None),
    (["--out-shard-size", "2GiB"], {"shard_bytes": 2 * 2**30}, None),
    (["--copy-tokenizer"], {"copy_tokenizer": True}, None),
    (["--no-copy-tokenizer"], {"copy_tokenizer": False}, None),
    (["--clone-tensors"], {}, None),
    (["--no-clone-tensors"], {}, None),
    (["--write-model-card"], {"write_model_card": True}, None),
    (["--no-write-model-card"], {"write_model_card": False}, None),
    (["--safe-serialization"], {}, None),
    (["--no-safe-serialization"], {}, "--no-safe-serialization changes nothing: mergesmith writes only safetensors"),
    # mergekit-multi's options (multi-stage recipes)
    (["-I", "work"], {"intermediate_dir": "work"}, None),
    (["--intermediate-dir", "work"], {"intermediate_dir": "work"}, None),
    (["--lazy"], {"lazy": True}, None),
    (["--no-lazy"], {"lazy": False}, None),
    # the notebook line
    (
        ["--copy-tokenizer", "--allow-crimes", "--out-shard-size", "1B", "--lazy-unpickle"],
        {"copy_tokenizer": True, "allow_crimes": True, "shard_bytes": 10**9},
        None,
    ),
    (["--cuda", "--low-cpu-memory"], {"device": "cuda"}, None),
]


def help_options() -> set:
    """Every option name in mergekit-yaml's --help (the option column: two spaces, then a dash)."""
    names = set()
    for line in HELP.read_text().splitlines():
        m = re.match(r"^  (-\S.*?)(?: {2,}|$)", line)
        if m:
            names |= set(re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", m.group(1)))
    return names


def test_the_table_covers_every_option_of_mergekit_yaml():
    names = help_options()
    assert len(names) == 39 and {"-j", "-v", "--no-lazy-unpickle", "--out-shard-size", "--gpu-rich"} <= names
    in_table = {a for args, _, _ in TABLE for a in args if a.startswith("-")}
    assert names - in_table == set()


def tiny_recipe(tmp_path: Path, extra: str = "") -> Path:
    t = tiny_dir()
    r = tmp_path / "r.yml"
    r.write_text(
        f"merge_method: linear\nmodels:\n  - model: {t / 'base'}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {t / 'sort'}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n{extra}"
    )
    return r


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


@pytest.mark.parametrize("args,want,note", TABLE, ids=[" ".join(a) or "defaults" for a, _, _ in TABLE])
def test_each_option_parses_with_mergekits_meaning(args, want, note, tmp_path, monkeypatch, capsys):
    import mergesmith.api

    seen = {}

    def fake_merge(recipe, out_dir, options):
        seen["options"] = options
        plan = types.SimpleNamespace(
            layout=types.SimpleNamespace(files=["model.safetensors"]), method=types.SimpleNamespace(randomized=False)
        )
        return types.SimpleNamespace(tensors=1, bytes_written=1, plan=plan, seconds=0.0, seed=1)

    monkeypatch.setattr(mergesmith.api, "merge", fake_merge)
    assert cli("run", tiny_recipe(tmp_path), tmp_path / "out", *args) == 0
    o = seen["options"]
    for field, value in want.items():
        assert getattr(o, field) == value, field
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert notes == ([] if note is None else [notes[0]]) and (note is None or note in notes[0])


def test_the_notebook_line_writes_one_shard_for_a_small_model(tmp_path, capsys):
    """`--out-shard-size 1B` is a billion (mergekit's unit), so the 4.7 MB tiny merge is one file, as with
    mergekit; it used to be one byte, one shard per tensor."""
    r = tiny_recipe(tmp_path)
    assert cli("plan", r, "--copy-tokenizer", "--allow-crimes", "--out-shard-size", "1B", "--lazy-unpickle") == 0
    assert "\ntensors: 39 in 1 file(s)," in capsys.readouterr().out
    out = tmp_path / "out"
    assert (
        cli("run", r, out, "--copy-tokenizer", "--allow-crimes", "--out-shard-size", "1B", "--lazy-unpickle", "--quiet")
        == 0
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


# mergekit-yaml 0.1.5 on this recipe (the tiny base and sort, linear, bfloat16: 39 tensors, 4,723,200 bytes, the
# largest 393,216): --out-shard-size 1M wrote 5 shards, 2M wrote 3; each shard held at most the count in bytes.
@pytest.mark.parametrize("size,shards", [("1M", 5), ("2M", 3)])
def test_counts_give_mergekits_shards(size, shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("run", tiny_recipe(tmp_path), out, "--out-shard-size", size, "--quiet") == 0
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) == shards
    limit = {"1M": 10**6, "2M": 2 * 10**6}[size]
    assert all(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") <= limit for f in files)


def test_folder_switches_take_effect(tmp_path):
    out = tmp_path / "out"
    assert cli("run", tiny_recipe(tmp_path), out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet") == 0
    assert (out / "model.safetensors").exists()
    assert not (out / "tokenizer.json").exists() and not (out / "README.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the request for a GPU on a machine without one")
@pytest.mark.parametrize("flag", ["--cuda", "--gpu-rich", "--multi-gpu"])
def test_gpu_flags_ask_for_the_gpu(flag, tmp_path, capsys):
    assert cli("run", tiny_recipe(tmp_path), tmp_path / "out", flag, "--low-cpu-memory", "--read-to-gpu") == 2
    assert "--device cuda was asked for, but torch sees no CUDA GPU" in capsys.readouterr().err
    assert cli("run", tiny_recipe(tmp_path), tmp_path / "out", flag, "--device", "cpu", "--quiet") == 0


def test_threads_flag_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        assert cli("run", tiny_recipe(tmp_path), tmp_path / "out", "-j", "1", "--quiet") == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_notes_and_refusals_of_options(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("run", tiny_recipe(tmp_path), out, "--trust-remote-code", "--no-safe-serialization", "--quiet") == 0
    err = capsys.readouterr().err.splitlines()
    assert len([e for e in err if "never runs code" in e]) == 1
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert cli("run", tiny_recipe(tmp_path), tmp_path / "o2", "--lora-merge-dtype", "float8") == 2
    assert capsys.readouterr().err.strip() == (
        "error: option --lora-merge-dtype 'float8': not a dtype; use bfloat16, float16 or float32"
    )
    for args in (["--write-threads", "0"], ["-j", "0"], ["--num-threads", "-1"]):
        assert cli("run", tiny_recipe(tmp_path), tmp_path / "o2", *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: option ") and "at least 1" in err[0]


# ------------------------------------------------------------------------------------ vocabularies of other sizes


@pytest.fixture(scope="module")
def two_vocabs(tmp_path_factory):
    """Two models alike but for their vocabulary: 320 and 336 rows (float32: rows compare exactly)."""
    root = tmp_path_factory.mktemp("vocabs")
    small = make_mistral(root / "small", seed=1, vocab=320, dtype=torch.float32)
    big = make_mistral(root / "big", seed=2, vocab=336, dtype=torch.float32)
    return root, small, big


def vocab_recipe(tmp_path, root, first, second, extra=""):
    r = tmp_path / "v.yml"
    r.write_text(
        f"merge_method: linear\nmodels:\n  - model: {root / first}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {root / second}\n    parameters: {{weight: 0.5}}\n{extra}"
    )
    return r


@pytest.mark.parametrize("first,second", [("small", "big"), ("big", "small")])
def test_vocabularies_of_other_sizes_are_refused_like_mergekit(two_vocabs, first, second, tmp_path, capsys):
    root, _, _ = two_vocabs
    rows = {"small": 320, "big": 336}
    assert cli("plan", vocab_recipe(tmp_path, root, first, second)) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if not e.startswith("warning:")]
    assert len(err) == 1
    assert f"has {rows[second]} vocabulary rows but {root / first}'s has {rows[first]}" in err[0]
    assert "tokenizer_source:" in err[0] and "--unsafe-truncate-embeddings" in err[0]
    assert cli("plan", vocab_recipe(tmp_path, root, first, second, "tokenizer_source: union\n")) == 0


def test_unsafe_truncate_embeddings_merges_row_for_row(two_vocabs, tmp_path):
    root, small, big = two_vocabs
    out = tmp_path / "out"
    assert (
        cli(
            "run",
            vocab_recipe(tmp_path, root, "small", "big"),
            out,
            "--unsafe-truncate-embeddings",
            "--no-copy-tokenizer",
            "--quiet",
        )
        == 0
    )
    got = read_folder(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        want = 0.5 * small[name] + 0.5 * big[name][:320]
        assert got[name].shape == (320, 64) and torch.allclose(got[name], want, atol=1e-6)
