"""Fuzzing: malformed recipes and corrupted safetensors files end in a MergeError (one line), never a crash."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SEED_RECIPE
from mergesmith.errors import MergeError
from mergesmith.io.index import index_model
from mergesmith.plan import make_plan
from mergesmith.recipe import parse_recipe

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def valid_safetensors() -> bytes:
    from safetensors.torch import save

    return save(
        {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
        metadata={"format": "pt"},
    )


GOOD = valid_safetensors()


def mutate_header(draw_ops, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    for op, val in draw_ops:
        name = "a" if val % 2 else "b"
        if op != "entry" and not isinstance(header[name], dict):
            continue
        if op == "offsets":
            header[name]["data_offsets"] = [val % 100, (val * 7) % 200]
        elif op == "dtype":
            header[name]["dtype"] = ["F32", "BF16", "Q4", "", 7, None][val % 6]
        elif op == "shape":
            header[name]["shape"] = [[val % 9], [-1, 2], "x", [2, 3, 4], [], [True]][val % 6]
        elif op == "drop":
            header[name].pop(["dtype", "shape", "data_offsets"][val % 3], None)
        elif op == "entry":
            header[name] = [None, 1, "x", [], {}][val % 5]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_corrupted_safetensors_is_refused_cleanly(tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["truncate", "flip", "length", "header", "garbage"]))
    blob = GOOD
    if kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([blob[i] ^ data.draw(st.integers(1, 255))]) + blob[i + 1 :]
    elif kind == "length":
        blob = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + blob[8:]
    elif kind == "header":
        ops = data.draw(
            st.lists(
                st.tuples(st.sampled_from(["offsets", "dtype", "shape", "drop", "entry"]), st.integers(0, 10**6)),
                min_size=1,
                max_size=3,
            )
        )
        blob = mutate_header(ops, blob)
    else:
        blob = data.draw(st.binary(max_size=200))
    folder = tmp_path_factory.mktemp("st")
    (folder / "model.safetensors").write_bytes(blob)
    try:
        idx = index_model("m", folder)
        for name in idx.tensors:  # whatever the header says, reading what it claims must work
            idx.read(name)
    except MergeError as e:
        assert "\n" not in str(e)


KEYS = [
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "slices",
    "tokenizer_source",
    "chat_template",
    "model",
    "weight",
    "density",
    "epsilon",
    "lambda",
    "filter",
    "value",
    "dype",
    "random_seed",
]
scalars = st.one_of(
    st.integers(-3, 3),
    st.floats(-2, 2) | st.just(float("nan")),
    st.booleans(),
    st.none(),
    st.sampled_from(["linear", "ties", "della_linear", "bfloat16", "x", "", "1e-3", "[", "{a: 1}"]),
)
yaml_values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(KEYS), kids, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, **SETTINGS)
@given(doc=st.dictionaries(st.sampled_from(KEYS), yaml_values, max_size=6))
def test_random_recipes_fail_cleanly(tmp_path_factory, doc, fam):
    import yaml

    text = yaml.safe_dump(doc)
    try:
        r = parse_recipe(text, "fuzz.yml")
        make_plan(r, seed=1)
    except MergeError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, **SETTINGS)
@given(cut=st.integers(0, 400), junk=st.text(max_size=6), pos=st.integers(0, 400))
def test_mangled_seed_recipe_fails_cleanly(fam, cut, junk, pos):
    b, f1, f2, f3 = fam
    text = SEED_RECIPE.format(base=b, ft1=f1, ft2=f2, ft3=f3)
    text = text[:pos] + junk + text[pos:]
    text = text[: len(text) - cut % len(text)]
    try:
        r = parse_recipe(text, "fuzz.yml")
        make_plan(r, seed=1)
    except MergeError as e:
        assert "\n" not in str(e)


def test_cli_on_corrupt_model_is_one_line_exit_2(tmp_path, capsys):
    from mergesmith.cli import main

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(GOOD[:-5])
    r = tmp_path / "r.yml"
    r.write_text(f"merge_method: linear\nmodels:\n  - model: {folder}\n    parameters:\n      weight: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: r.yml:3: ") and "truncated" in err[0]
    assert not (tmp_path / "o").exists()


def test_pickle_bin_with_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "m"
    folder.mkdir()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(MergeError, match="weights_only=True"):
        index_model("m", folder)


def test_bin_weights_load(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"w": torch.ones(2, 3)}, folder / "pytorch_model.bin")
    idx = index_model("m", folder)
    assert torch.equal(idx.read("w"), torch.ones(2, 3))
