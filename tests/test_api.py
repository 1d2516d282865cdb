"""The Python API (`import mergesmith`): recipes from paths, text and dicts; merges into folders and into memory
with the folder's bytes; options checked in one place; `mergesmith plan` and `run` agree; no import cycle."""

import ast
import json
import re
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergesmith
from helpers import make_mistral
from mergesmith.cli import main
from mergesmith.demo import method_recipes, recipe_path, tiny_dir

SRC = Path(mergesmith.__file__).resolve().parent
DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"


# ------------------------------------------------------------------------------------------- imports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set) -> set:
    """The package's modules that `path` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from mergesmith import outdir` imports the module mergesmith.outdir; `from m import name`, m itself
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict):
    """One cycle of the graph as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v) :] + [v]
            if v not in state:
                cycle = visit(v)
                if cycle:
                    return cycle
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state:
            cycle = visit(u)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imported(f, modules) for f in files}
    assert "mergesmith.api" in graph["mergesmith"] and "mergesmith.api" in graph["mergesmith.cli"]  # it sees them
    assert "mergesmith.methods.registry" in graph["mergesmith.methods"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_import_mergesmith_is_light_and_names_the_api():
    code = (
        "import sys, mergesmith; light = 'torch' not in sys.modules; import mergesmith.plan; "
        "print(light, callable(mergesmith.plan_merge), mergesmith.merge.__module__, 'merge' in dir(mergesmith))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "mergesmith.api", "True"], out.stderr[-2000:]


def test_every_public_name_has_a_docstring():
    for name in mergesmith.__all__:
        if name != "__version__":
            assert (getattr(mergesmith, name).__doc__ or "").strip(), name


# ------------------------------------------------------------------------------------------- recipes


def plan_key(p):
    return (
        [(t.name, t.kind, t.shared, t.per_input, [(r.model, r.name) for r in t.inputs]) for t in p.tasks],
        {ref: idx.path.resolve() for ref, idx in p.models.items()},
    )


def test_a_recipe_from_a_path_text_or_dict_plans_the_same(tmp_path, monkeypatch):
    opts = mergesmith.MergeOptions(seed=1)
    monkeypatch.chdir(tmp_path)  # the file's relative model paths resolve against its own folder
    by_path = plan_key(mergesmith.plan_merge(str(recipe_path()), opts))
    assert plan_key(mergesmith.plan_merge(recipe_path(), opts)) == by_path
    text = recipe_path().read_text(encoding="utf-8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # `tiny/reverse` could be a Hub id: no download
    with pytest.raises(mergesmith.MergeError, match="<recipe text>:2: model 'tiny/reverse' is not on disk"):
        mergesmith.plan_merge(text, opts)  # text: relative to the working directory
    monkeypatch.chdir(recipe_path().parent)
    from_text = mergesmith.load_recipe(text)
    from_dict = mergesmith.load_recipe(yaml.safe_load(text))
    monkeypatch.chdir(tmp_path)  # they remember the folder they were loaded in
    assert plan_key(mergesmith.plan_merge(from_text, opts)) == by_path
    assert plan_key(mergesmith.plan_merge(from_dict, opts)) == by_path
    assert by_path[1]["tiny/base"] == (tiny_dir() / "base").resolve()


def test_bad_recipe_sources_are_one_line_errors(tmp_path):
    with pytest.raises(mergesmith.MergeError, match="a recipe is a YAML file's path, YAML text, a dict or a Recipe"):
        mergesmith.load_recipe(42)
    with pytest.raises(mergesmith.MergeError, match="recipe not found"):
        mergesmith.load_recipe(tmp_path / "missing.yml")
    with pytest.raises(mergesmith.MergeError, match=r"<recipe text>:2: unknown key 'modelz'.*refused under --strict"):
        mergesmith.load_recipe("merge_method: linear\nmodelz: []\n", strict=True)
    with pytest.raises(mergesmith.MergeError, match="<recipe dict>: .*use strings, numbers"):
        mergesmith.load_recipe({"merge_method": "linear", "models": [{"model": object()}]})


# ------------------------------------------------------------------------------------------- merging


def ties_dict():
    """The Stellar Odyssey recipe with ties, as a dict with absolute model paths."""
    d = yaml.safe_load(recipe_path().read_text(encoding="utf-8"))
    d["merge_method"] = "ties"
    d["base_model"] = tiny_dir() / "base"  # a Path: written as its string
    for m in d["models"]:
        m["model"] = str(tiny_dir() / Path(m["model"]).name)
    return d


def folder_order(out: Path) -> list:
    """Tensor names in the order of the output files: by file, then by offset in it."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    names = []
    for f in sorted(set(index["weight_map"].values())):
        raw = (out / f).read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda n: header[n]["data_offsets"][0])
    return names


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


CASES = {
    "della_linear": lambda: recipe_path(),
    "ties": ties_dict,
    "slerp": lambda: method_recipes()["slerp"],
    "passthrough slices": lambda: mergesmith.load_recipe(method_recipes()["passthrough"]),
    "della_linear in row blocks": lambda: str(recipe_path()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_memory_tensors_are_the_folders_bytes(case, tmp_path, monkeypatch):
    import mergesmith.plan

    if case.endswith("row blocks"):
        monkeypatch.setattr(mergesmith.plan, "BLOCK_ELEMENTS", 5000)
    opts = mergesmith.MergeOptions(seed=1, progress=False, out_shard_size="2MB")
    p = mergesmith.plan_merge(CASES[case](), opts)
    assert any(len(mergesmith.plan.row_blocks(p, t)) > 1 for t in p.tasks) == case.endswith("row blocks")
    out = tmp_path / "out"
    mergesmith.merge(CASES[case](), out, opts)
    folder = {}
    for f in sorted(out.glob("*.safetensors")):
        folder.update(load_file(str(f)))
    names = [name for name, _ in mergesmith.iter_merged(CASES[case](), opts)]
    memory = mergesmith.merge_in_memory(CASES[case](), opts)
    assert len(list(out.glob("*.safetensors"))) > 1 and names == folder_order(out)
    assert sorted(memory) == sorted(folder)
    bad = [n for n in folder if not same_bytes(memory[n], folder[n])]
    assert not bad, bad[:3]


def test_merge_returns_what_it_wrote(tmp_path):
    out = tmp_path / "merged"
    res = mergesmith.merge(recipe_path(), out, mergesmith.MergeOptions(progress=False, out_shard_size=2_000_000))
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    assert res.path == out.resolve() and res.tensors == len(tensors) and res.resumed_tensors == 0
    assert res.bytes_written == sum(t.numel() * t.element_size() for t in tensors.values())
    assert 0 < res.seconds < 600 and isinstance(res.plan, mergesmith.Plan)
    # no seed given: one was drawn, recorded in the recipe copy, and it reproduces the merge
    assert isinstance(res.seed, int) and f"# seed: {res.seed} " in (out / "mergesmith_config.yml").read_text()
    again = mergesmith.merge_in_memory(recipe_path(), mergesmith.MergeOptions(seed=res.seed))
    assert all(same_bytes(again[n], t) for n, t in tensors.items())
    assert len(list(out.glob("*.safetensors"))) == 3  # 2_000_000 bytes: as "2MB" (9.4 MB of bf16 tensors)
    with pytest.raises(mergesmith.MergeError, match="exists and is not empty; pass --overwrite"):
        mergesmith.merge(recipe_path(), out, mergesmith.MergeOptions(progress=False))


def test_iter_merged_checks_the_recipe_before_the_first_tensor(tmp_path):
    with pytest.raises(mergesmith.MergeError, match="model path not found: nowhere"):
        mergesmith.iter_merged("merge_method: linear\nmodels:\n  - model: nowhere\n")  # not at the first next()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("threads", 0, r"option threads \(--threads\) 0: give at least 1"),
        ("threads", -2, "give at least 1 thread"),
        ("threads", 1.5, "give at least 1 thread"),
        ("device", "mps", r"option device \(--device\) 'mps': use cpu, cuda, cuda:N or auto"),
        ("device", "cuda:x", "use cpu, cuda, cuda:N or auto"),
        ("dtype", "bfloat17", r"option dtype \(--dtype\) 'bfloat17': not a dtype"),
        ("out_dtype", "int8", "not a dtype; use bfloat16, float16 or float32"),
        ("gradient_span", "layers", "use slice or output"),
        ("out_shard_size", "0.1", "bad size"),
        ("out_shard_size", 0, "bad size"),
        ("out_shard_size", 1.5e9, "give a size like '5GB' or a number of bytes"),
        ("seed", "1", "give a whole number"),
        ("seed", True, "give a whole number"),
        ("strict", "yes", r"option strict 'yes': give True or False"),
        ("progress", None, "give True or False"),
    ],
)
def test_bad_options_are_one_line_merge_errors(field, value, message):
    with pytest.raises(mergesmith.MergeError, match=message) as e:
        mergesmith.MergeOptions(**{field: value})
    assert "\n" not in str(e.value)


def test_options_must_be_merge_options(tmp_path):
    with pytest.raises(mergesmith.MergeError, match="give a mergesmith.MergeOptions, not dict"):
        mergesmith.merge(recipe_path(), tmp_path / "o", {"seed": 1})
    assert not (tmp_path / "o").exists()


def test_the_plan_prints_what_the_plan_command_prints(capsys):
    p = mergesmith.plan_merge(recipe_path(), mergesmith.MergeOptions(seed=3))
    text = mergesmith.describe(p)
    assert text.startswith("recipe: stellar-odyssey-tiny.yml\nmethod: della_linear") and "seed:   3\n" in text
    with pytest.raises(SystemExit) as e:
        main(["plan", str(recipe_path()), "--seed", "3"])
    assert e.value.code == 0 and capsys.readouterr().out == text + "\n"


# ------------------------------------------------------------------------------------------- plan = run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 6-layer model and a fine-tune of it."""
    root = tmp_path_factory.mktemp("pair")
    sd = make_mistral(root / "a", seed=1, layers=6, tokenizer=False)
    make_mistral(root / "a_ft", seed=3, layers=6, from_state=sd, noise=0.02, tokenizer=False)
    return root


TWO_SLICES = """slices:
  - sources:
      - {{model: {a}, layer_range: [0, 3], parameters: {{weight: [0, 1]}}}}
      - {{model: {ft}, layer_range: [3, 6], parameters: {{weight: 1}}}}
  - sources:
      - {{model: {a}, layer_range: [5, 6], parameters: {{weight: [0, 1]}}}}
      - {{model: {ft}, layer_range: [0, 1], parameters: {{weight: 1}}}}
merge_method: linear
dtype: float32
"""
GROUP = re.compile(r"^\s+(\d+) x linear\[normalize=True\] a: weight=([-\d.e]+); a_ft: weight=1$")


def weights_used(out: Path, a: dict, ft: dict) -> Counter:
    """Per output tensor, a's weight t the merge used: linear gives (t a + b) / (t + 1), so t = <b - o, o - a> /
    |o - a|^2 (o the output, b a_ft's tensor), rounded as `mergesmith plan` prints it."""
    src = {0: (0, 3), 1: (1, 4), 2: (2, 5), 3: (5, 0)}  # output layer: (a's layer, a_ft's layer)
    used = Counter()
    for name, o in load_file(str(out / "model.safetensors")).items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        ia, ib = src[int(m.group(1))] if m else (None, None)
        xa = a[name if m is None else name.replace(m.group(0), f".layers.{ia}.")].double()
        xb = ft[name if m is None else name.replace(m.group(0), f".layers.{ib}.")].double()
        d = o.double() - xa
        used[float(f"{float(((xb - o.double()) * d).sum() / (d * d).sum()):.4g}")] += 1
    return used


@pytest.mark.parametrize("span, want", [("slice", [0, 0.5, 1, 1]), ("output", [0, 1 / 3, 2 / 3, 1])])
def test_plan_prints_the_weights_run_uses(pair, tmp_path, capsys, span, want):
    r = tmp_path / "r.yml"
    r.write_text(TWO_SLICES.format(a=pair / "a", ft=pair / "a_ft"))
    with pytest.raises(SystemExit):
        main(["plan", str(r), "--gradient-span", span])
    lines = capsys.readouterr().out.splitlines()
    printed = Counter()
    for line in lines:
        m = GROUP.match(line)
        if m:
            printed[float(m.group(2))] += int(m.group(1))
    with pytest.raises(SystemExit) as e:
        main(["run", str(r), str(tmp_path / "out"), "--gradient-span", span, "--quiet"])
    assert e.value.code == 0
    a, ft = load_file(str(pair / "a" / "model.safetensors")), load_file(str(pair / "a_ft" / "model.safetensors"))
    used = weights_used(tmp_path / "out", a, ft)
    assert printed == used
    # hand-checked: 9 tensors per layer at t of its layer; embeddings, final norm and lm_head at t = 0
    expected = Counter()
    for t in want:
        expected[float(f"{t:.4g}")] += 9
    expected[0.0] += 3
    assert used == expected


# ------------------------------------------------------------------------------------------- docs


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks and "examples/stellar-odyssey-tiny.yml" in blocks[0]
    monkeypatch.chdir(tmp_path)
    code = blocks[0].replace("examples/stellar-odyssey-tiny.yml", str(recipe_path()))
    exec(compile(code, str(DOCS), "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert "method: della_linear" in out and "tensors" in out and "best weight" in out
    assert (tmp_path / "out" / "stellar-odyssey" / "config.json").is_file()
