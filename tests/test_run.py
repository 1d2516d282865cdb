"""End to end: recipes run into Hugging Face folders that load, chat, and reproduce byte for byte."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SEED_RECIPE, read_folder, run_recipe
from mergesmith.cli import main

REPO = Path(__file__).resolve().parents[1]
SEED_FILE = REPO.parent / "shared" / "reference" / "stellar-odyssey-recipe.yml"


def write_recipe(tmp_path, fam, text=SEED_RECIPE, name="recipe.yml"):
    b, f1, f2, f3 = fam
    p = tmp_path / name
    p.write_text(text.format(base=b, ft1=f1, ft2=f2, ft3=f3))
    return p


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def test_seed_recipe_runs_loads_and_chats(tmp_path, fam):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path, fam)
    out = tmp_path / "merged"
    assert cli("run", recipe, out, "--seed", 7, "--quiet") == 0
    assert not (tmp_path / "merged.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert tok.decode(ids[0]).startswith("<|im_start|>user\nhello world<|im_end|>")
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"
    copy = (out / "mergesmith_config.yml").read_text()
    assert "# seed: 7" in copy and "della_linear" in copy
    card = (out / "README.md").read_text()
    for section in (
        "library_name: transformers",
        "- mergesmith",
        "## Merge Details",
        "### Merge Method",
        "https://arxiv.org/abs/2406.11617",
        "### Models Merged",
        "### Configuration",
    ):
        assert section in card


def test_same_seed_same_bytes_any_threads(tmp_path, fam):
    recipe = write_recipe(tmp_path, fam)
    run_recipe(str(recipe), str(tmp_path / "a"), seed=11, threads=1)
    run_recipe(str(recipe), str(tmp_path / "b"), seed=11, threads=2, out_shard_size="60KB")
    run_recipe(str(recipe), str(tmp_path / "c"), seed=12)
    a, b, c = (read_folder(tmp_path / x) for x in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.set_num_threads(max(1, torch.get_num_threads()))


def test_seed_is_recorded_when_not_given(tmp_path, fam):
    recipe = write_recipe(tmp_path, fam)
    run_recipe(str(recipe), str(tmp_path / "a"))
    line = next(
        ln for ln in (tmp_path / "a" / "mergesmith_config.yml").read_text().splitlines() if ln.startswith("# seed:")
    )
    seed = int(line.split()[2])
    run_recipe(str(recipe), str(tmp_path / "b"), seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_tensor_alone_equals_tensor_in_full_run(tmp_path, fam):
    """Order-free randomness: a tensor computed on its own equals the same tensor from the whole run."""
    from mergesmith.execute import compute_tensor
    from mergesmith.plan import make_plan
    from mergesmith.recipe import load_recipe

    recipe = write_recipe(tmp_path, fam)
    run_recipe(str(recipe), str(tmp_path / "a"), seed=5)
    full = read_folder(tmp_path / "a")
    plan = make_plan(load_recipe(recipe), seed=5)
    for task in reversed(plan.tasks):
        assert torch.equal(compute_tensor(plan, task, torch.device("cpu")), full[task.name])


def _bf16_step(x: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place between two bf16 tensors (via their ordered int16 patterns)."""
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -32768 - i, i)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_bf16_output_is_correctly_rounded(tmp_path, fam, method):
    b, f1, f2, f3 = fam
    ws, ds = [0.3, 0.1, 0.4], [0.25, 0.4, 0.5]
    base_line = "" if method == "linear" else f"base_model: {b}\n"
    text = f"merge_method: {method}\n{base_line}dtype: bfloat16\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters:\n      weight: {w}\n      density: {d}\n" for p, w, d in zip(fam[1:], ws, ds)
    )
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    run_recipe(str(recipe), str(tmp_path / "o"))
    out = read_folder(tmp_path / "o")
    ins = [read_folder(p) for p in fam]
    total = agree = 0
    # The float64 reference keeps the decimal weights exact by writing them as integers over 10 (0.3 = 3/10):
    # bf16 inputs make exact zeros and exact halfway cases common, and a float64 0.3 would decide those at random.
    wn = [3, 1, 4]
    for name, got in out.items():
        base = ins[0][name].double().numpy()
        xs = [d[name].double().numpy() for d in ins[1:]]
        if method == "linear":
            ref = sum(n * x for n, x in zip(wn, xs)) / sum(wn)
        elif method == "task_arithmetic":
            ref = base + sum(n * (x - base) for n, x in zip(wn, xs)) / 10
        else:
            deltas = []
            for x, n, d in zip(xs, wn, ds):
                delta = (x - base).ravel()
                keep = np.argsort(-np.abs(delta), kind="stable")[: max(1, int(d * delta.size))]
                m = np.zeros(delta.size)
                m[keep] = 1
                deltas.append((n * delta * m).reshape(base.shape))
            elected = np.where(sum(deltas) >= 0, 1, -1)
            num = sum(np.where(np.sign(dl) == elected, dl, 0) for dl in deltas)
            den = sum(np.where(np.sign(dl) == elected, n, 0) for dl, n in zip(deltas, wn))
            ref = base + num / np.where(den == 0, 1, den)
        want = torch.from_numpy(ref).to(torch.bfloat16)
        steps = (_bf16_step(got) - _bf16_step(want)).abs()
        # Where the exact result cancels to ~0 (bf16 inputs and decimal weights do that), bf16 steps are
        # meaningless: any float arithmetic leaves a residue far below the inputs' own resolution. There we require
        # |got| < 2^-16 of the inputs' magnitude instead.
        scale = torch.from_numpy(np.max(np.abs(np.stack([base] + xs)), axis=0))
        cancel = torch.from_numpy(np.abs(ref)) < scale * 2**-16
        assert (got.double().abs()[cancel] <= scale[cancel] * 2**-16).all(), name
        steps = torch.where(cancel, torch.zeros_like(steps), steps)
        assert steps.max().item() <= 1, name
        total += steps.numel()
        agree += (steps == 0).sum().item()
    assert agree / total >= 0.999


def test_sharded_output_loads_with_transformers(tmp_path, fam):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, fam)
    out = tmp_path / "o"
    run_recipe(str(recipe), str(out), seed=1, out_shard_size="50KB", out_dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    sd = read_folder(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_existing_output_refused_without_overwrite(tmp_path, fam):
    recipe = write_recipe(tmp_path, fam)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli("run", recipe, out, "--quiet") == 2
    assert (out / "keep.txt").exists()
    assert cli("run", recipe, out, "--quiet", "--overwrite") == 2  # --overwrite replaces only mergesmith's outputs
    assert (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert cli("run", recipe, out, "--quiet") == 0
    assert cli("run", recipe, out, "--quiet") == 2
    assert cli("run", recipe, out, "--quiet", "--overwrite") == 0
    assert (out / "model.safetensors").exists()


def test_della_epsilon_out_of_range_is_refused_before_work(tmp_path, fam, capsys):
    text = SEED_RECIPE.replace("epsilon: 0.05", "epsilon: 0.3")
    recipe = write_recipe(tmp_path, fam, text)
    assert cli("run", recipe, tmp_path / "o", "--quiet") == 2
    err = capsys.readouterr().err
    assert "recipe.yml:5: model" in err and "density 0.25 with epsilon 0.3" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_plan_prints_groups_bytes_and_memory(tmp_path, fam, capsys):
    recipe = write_recipe(tmp_path, fam)
    assert cli("plan", recipe, "--seed", 3) == 0
    out = capsys.readouterr().out
    assert "della_linear" in out and "weight=0.3, density=0.25, epsilon=0.05" in out
    assert "read:" in out and "write:" in out and "peak memory" in out
    assert "seed:   3" in out


def test_unknown_parameter_warns_with_suggestion(tmp_path, fam, capsys):
    text = SEED_RECIPE.replace("      density: 0.4", "      densty: 0.4")
    recipe = write_recipe(tmp_path, fam, text)
    assert cli("plan", recipe) == 0
    err = capsys.readouterr().err
    assert "recipe.yml:9: parameter 'densty' is not used by della_linear (did you mean 'density'?)" in err


def test_verbatim_seed_recipe_fails_cleanly_naming_first_model(tmp_path):
    recipe = SEED_FILE if SEED_FILE.exists() else None
    if recipe is None:
        from test_recipe import SEED_TEXT

        recipe = tmp_path / "stellar-odyssey-recipe.yml"
        recipe.write_text(SEED_TEXT)
    p = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(recipe), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        r"error: stellar-odyssey-recipe.yml:2: model path not found: "
        r"C:\Users\\Downloads\Mergekit-Fixed\mergekit\Sao10K_MN-12B-Lyra-v4"
    ]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "method",
    ["della_linear", "della", "dare_ties", "linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"],
)
def test_row_blocks_give_the_same_bytes(tmp_path, fam, monkeypatch, method):
    """Large tensors are merged in row blocks (two passes for whole-tensor L1 sums): same bytes as whole."""
    import mergesmith.plan as ex

    text = SEED_RECIPE.replace("merge_method: della_linear", f"merge_method: {method}")
    if method == "linear":
        text = text.replace("base_model: {base}\n", "")
    recipe = write_recipe(tmp_path, fam, text)
    run_recipe(str(recipe), str(tmp_path / "whole"), seed=3)
    monkeypatch.setattr(ex, "BLOCK_ELEMENTS", 1000)
    from mergesmith.plan import make_plan
    from mergesmith.recipe import load_recipe

    plan = make_plan(load_recipe(recipe), seed=3)
    assert max(len(ex.row_blocks(plan, t)) for t in plan.tasks) > 4
    run_recipe(str(recipe), str(tmp_path / "blocks"), seed=3)
    assert digest(tmp_path / "whole") == digest(tmp_path / "blocks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_gives_the_same_bytes_as_cpu(tmp_path, fam):
    recipe = write_recipe(tmp_path, fam)
    run_recipe(str(recipe), str(tmp_path / "cpu"), seed=21, device="cpu")
    run_recipe(str(recipe), str(tmp_path / "gpu"), seed=21, device="cuda")
    assert digest(tmp_path / "cpu") == digest(tmp_path / "gpu")


def test_cuda_asked_without_gpu_is_a_clean_error(tmp_path, fam, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    recipe = write_recipe(tmp_path, fam)
    assert cli("run", recipe, tmp_path / "o", "--cuda", "--quiet") == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec,expect",
    [
        ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"),
        ("auto", "<|im_start|>user\nhi<|im_end|>"),
        ("'{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}'", "[user] hi"),
    ],
)
def test_chat_template_is_written_where_transformers_reads_it(tmp_path, fam, spec, expect):
    from transformers import AutoTokenizer

    escaped = spec.replace("{", "{{").replace("}", "}}")  # write_recipe fills the paths with str.format
    recipe = write_recipe(tmp_path, fam, SEED_RECIPE + f"chat_template: {escaped}\n")
    out = tmp_path / "o"
    run_recipe(str(recipe), str(out), seed=1)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith(expect) or text == tok.bos_token + expect or text.startswith(tok.bos_token + expect)
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
        == (out / "chat_template.jinja").read_text()
    )


def test_unknown_chat_template_is_refused_before_work(tmp_path, fam, capsys):
    recipe = write_recipe(tmp_path, fam, SEED_RECIPE + "chat_template: chatlm\n")
    assert cli("run", recipe, tmp_path / "o", "--quiet") == 2
    assert "chat_template 'chatlm' is not a known name (did you mean 'chatml'?)" in capsys.readouterr().err
    assert not (tmp_path / "o.partial").exists()


def test_base_without_tokenizer_warns_and_still_writes(tmp_path, capsys):
    from helpers import make_mistral

    base = make_mistral(tmp_path / "b", seed=0, tokenizer=False)
    make_mistral(tmp_path / "f", seed=1, from_state=base, noise=0.01, tokenizer=False)
    r = tmp_path / "r.yml"
    r.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'b'}\nmodels:\n"
        f"  - model: {tmp_path / 'f'}\n    parameters:\n      weight: 0.5\n"
    )
    assert cli("run", r, tmp_path / "o", "--quiet") == 0
    assert "has no tokenizer files; the output has no tokenizer" in capsys.readouterr().err
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_nan_input_warns_strict_refuses(tmp_path, fam, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    b, f1, f2, f3 = fam
    bad = tmp_path / "ft_nan"
    shutil.copytree(f1, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    text = (
        f"merge_method: linear\nmodels:\n  - model: {bad}\n    parameters:\n      weight: 1\n"
        f"  - model: {f2}\n    parameters:\n      weight: 1\n"
    )
    r = tmp_path / "r.yml"
    r.write_text(text)
    # the NaN reaches the output: an error naming the tensor, after a warning naming model and tensor
    assert cli("run", r, tmp_path / "o", "--quiet") == 2
    err = capsys.readouterr().err
    assert f"model {bad}: tensor model.layers.0.mlp.up_proj.weight holds NaN or Inf values" in err
    assert "error: tensor model.layers.0.mlp.up_proj.weight: the merge produced NaN or Inf" in err
    assert cli("run", r, tmp_path / "o2", "--quiet", "--strict") == 2
    assert "holds NaN or Inf values (refused under --strict)" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["della_linear", "ties"])
def test_nan_in_a_stored_row_block_input_warns_strict_refuses(tmp_path, fam, capsys, monkeypatch, method):
    """DARE/DELLA and the magnitude cuts in row blocks read bfloat16 inputs as stored (not widened): NaN or Inf in
    one is still found on the first read, named by model and tensor, and refused under --strict."""
    import shutil

    import mergesmith.plan
    from safetensors.torch import load_file, save_file

    b, f1, f2, f3 = fam
    bad = tmp_path / "ft_inf"
    shutil.copytree(f2, bad)
    sd = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert sd[name].dtype == torch.bfloat16
    sd[name][-1, -1] = float("-inf")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(mergesmith.plan, "BLOCK_ELEMENTS", 1000)
    text = SEED_RECIPE.replace("della_linear", method)
    r = write_recipe(tmp_path, (b, f1, bad, f3), text if method != "ties" else text.replace("  epsilon: 0.05\n", ""))
    assert cli("run", r, tmp_path / "o", "--quiet", "--seed", 1) == 2  # the Inf reaches the output
    assert f"model {bad}: tensor {name} holds NaN or Inf values" in capsys.readouterr().err
    assert cli("run", r, tmp_path / "o2", "--quiet", "--seed", 1, "--strict") == 2
    assert "holds NaN or Inf values (refused under --strict)" in capsys.readouterr().err


def test_a_float32_base_beside_bfloat16_models_in_row_blocks(tmp_path, fam, monkeypatch):
    """Mixed dtypes (a float32 base, bfloat16 fine-tunes) in DARE/DELLA row blocks: the bfloat16 blocks are widened
    so the mask kernel still takes x and base, and the merge has the bytes of the all-bfloat16 family (the same
    values)."""
    import shutil

    import mergesmith.plan
    from mergesmith.methods import compiled
    from safetensors.torch import load_file, save_file

    b, f1, f2, f3 = fam
    wide = tmp_path / "base32"
    shutil.copytree(b, wide)
    for f in wide.glob("*.safetensors"):
        save_file({k: v.float() for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    run_recipe(str(write_recipe(tmp_path, fam)), str(tmp_path / "bf16"), seed=2)
    monkeypatch.setattr(mergesmith.plan, "BLOCK_ELEMENTS", 1000)
    bases, real = [], compiled.keep_masks
    monkeypatch.setattr(
        compiled, "keep_masks", lambda *a, **k: bases.append(a[5] if len(a) > 5 else k.get("base")) or real(*a, **k)
    )
    run_recipe(str(write_recipe(tmp_path, (wide, f1, f2, f3), name="mixed.yml")), str(tmp_path / "mixed"), seed=2)
    assert bases and all(x is not None and x.dtype == torch.float32 for x in bases)
    assert digest(tmp_path / "mixed") == digest(tmp_path / "bf16")


def test_allocator_settings_only_for_row_block_merges(tmp_path, fam, monkeypatch):
    """`mergesmith run` keeps freed block buffers in the heap (mergesmith.allocator) when the plan streams row
    blocks (della_linear: 267 -> 144 s on the Nemo-shaped benchmark), and not for whole-tensor merges (their peak
    memory grows with a never-trimmed heap)."""
    import mergesmith.allocator
    import mergesmith.plan

    calls = []
    monkeypatch.setattr(mergesmith.allocator, "reuse_freed_blocks", lambda: calls.append(1))
    recipe = write_recipe(tmp_path, fam)
    assert cli("run", recipe, tmp_path / "whole", "--seed", 1, "--quiet") == 0  # the tensors fit one block
    assert calls == []
    monkeypatch.setattr(mergesmith.plan, "BLOCK_ELEMENTS", 1000)
    assert cli("run", recipe, tmp_path / "blocks", "--seed", 1, "--quiet") == 0
    assert calls == [1]
    run_recipe(str(recipe), str(tmp_path / "library"), seed=1)  # the API leaves the allocator alone by default
    assert calls == [1]
    run_recipe(str(recipe), str(tmp_path / "tuned"), seed=1, tune_allocator=True)
    assert calls == [1, 1]


def test_allocator_settings_apply_in_process():
    """mallopt accepts every setting on glibc Linux (checked in a child: the settings last for the process)."""
    code = "from mergesmith.allocator import reuse_freed_blocks as r; print(r())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False"), out.stderr


_GC_PROBE = """
import atexit, gc, sys
during = []  # collections while torch is imported but nothing frozen yet
unfrozen = lambda: "torch" in sys.modules and not gc.get_freeze_count()
gc.callbacks.append(lambda phase, info: phase == "start" and unfrozen() and during.append(1))
atexit.register(lambda: print(gc.get_freeze_count(), "torch" in sys.modules, len(during), gc.isenabled()))
sys.argv = ["mergesmith"] + sys.argv[1:]
from mergesmith.cli import main
main()
"""


@pytest.mark.parametrize("args, imported", [(["methods"], True), (["methods", "--help"], False), ([], False)])
def test_the_command_imports_torch_without_collecting_then_freezes_it(args, imported):
    """A command's process imports torch with the cyclic collector off and freezes what it made (no collection
    walks it again, at exit included); help alone imports nothing. Checked in a child: gc.freeze is process-wide."""
    out = subprocess.run([sys.executable, "-c", _GC_PROBE, *args], capture_output=True, text=True)
    frozen, torch_in, during, enabled = out.stdout.strip().splitlines()[-1].split()
    assert (torch_in, during, enabled) == (str(imported), "0", "True"), out.stdout + out.stderr
    assert (int(frozen) > 100_000) == imported, frozen


def test_blocks_two_at_a_time_come_back_in_order():
    """execute.in_order: results in the items' order even when an earlier item finishes last, never more than
    `width` running at once."""
    import threading
    import time

    from mergesmith.execute import in_order

    running, peak, lock = [0], [0], threading.Lock()

    def fn(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 if i % 2 == 0 else 0.0)
        with lock:
            running[0] -= 1
        return i

    assert list(in_order(fn, list(range(9)), 2)) == list(range(9))
    assert peak[0] == 2
    assert list(in_order(fn, range(3), 1)) == [0, 1, 2]


def reads_in_flight(monkeypatch, pause: float) -> list:
    """Count the executor's block reads in progress (each held `pause` s first): returns [the most at once]."""
    import threading
    import time

    import mergesmith.execute

    running, peak, lock = [0], [0], threading.Lock()
    real = mergesmith.execute._read

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(pause)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(mergesmith.execute, "_read", counted)
    return peak


def test_blocks_in_flight_are_bounded_over_all_tensors(tmp_path, fam, monkeypatch):
    """The executor reads and computes at most execute.BLOCKS blocks at once over the tensors in flight (two
    tensors, up to three blocks of one), and does run blocks side by side."""
    import mergesmith.execute
    import mergesmith.plan

    peak = reads_in_flight(monkeypatch, 0.01)
    monkeypatch.setattr(mergesmith.plan, "BLOCK_ELEMENTS", 1000)
    ties = SEED_RECIPE.replace("della_linear", "ties").replace("  epsilon: 0.05\n", "")
    assert cli("run", write_recipe(tmp_path, fam, ties), tmp_path / "o", "--seed", 1, "--quiet") == 0
    assert peak[0] == mergesmith.execute.BLOCKS == 3


def test_a_tensor_alone_has_one_block_more_than_the_cores_in_flight(monkeypatch):
    """A tensor merged alone in row blocks computes execute.BLOCKS of them at once (one more than the cores: a block
    that takes longer than the next leaves no core idle), its output in block order."""
    import mergesmith.execute
    from helpers import through_executor

    peak = reads_in_flight(monkeypatch, 0.02)
    xs = [torch.randn(64, 50) for _ in range(2)]
    out, blocks, _ = through_executor("linear", None, xs, 500, monkeypatch, per=[{"weight": 1.0}, {"weight": 1.0}])
    assert len(blocks) > 6 and peak[0] == mergesmith.execute.BLOCKS == 3
    assert torch.allclose(out.double(), (xs[0].double() + xs[1].double()) / 2, atol=1e-6)  # linear normalizes


def test_row_blocks_are_read_ahead(tmp_path, fam, monkeypatch):
    """Before a row block is read, the kernel is asked (posix_fadvise WILLNEED) for the blocks after it: every
    advice is a whole number of rows inside one tensor's bytes (offsets from the file's own header), and together
    the advice covers every byte of each row-block tensor of every input."""
    import struct

    import mergesmith.plan

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    advised = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((os.path.realpath(f"/proc/self/fd/{fd}"), offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(mergesmith.plan, "BLOCK_ELEMENTS", 1000)
    recipe = write_recipe(tmp_path, fam)
    assert cli("run", recipe, tmp_path / "o", "--seed", 1, "--quiet") == 0
    spans = {}  # file -> [(start, end, row bytes, streamed in row blocks)] of its tensors
    for f in sorted({a[0] for a in advised}):
        raw = Path(f).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        for name, info in json.loads(raw[8 : 8 + n]).items():
            if name != "__metadata__":
                a, b = info["data_offsets"]
                big = len(info["shape"]) == 2 and np.prod(info["shape"]) > 1000
                rows = info["shape"][0] if info["shape"] else 1
                spans.setdefault(f, []).append((8 + n + a, 8 + n + b, (b - a) // rows, big))
    assert any(s[3] for ss in spans.values() for s in ss)
    for f, off, length in advised:
        inside = [s for s in spans[f] if s[0] <= off and off + length <= s[1]]
        assert inside and (off - inside[0][0]) % inside[0][2] == 0 and length % inside[0][2] == 0
    for f, ss in spans.items():
        for start, end, _, big in ss:
            if not big:
                continue
            covered = sorted((o, o + n) for g, o, n in advised if g == f and start <= o < end)
            reach = start
            for o, e in covered:
                assert o <= reach, f"{f}: bytes {reach}..{o} never advised"
                reach = max(reach, e)
            assert reach == end


def test_expected_peak_of_a_copy_is_its_bytes_not_a_merges_working_set(tmp_path, fam):
    """`mergesmith plan`'s peak estimate: a passthrough copies tensors as they are, so it expects about two of the
    largest tensors in flight (in their stored dtype), where a merge of the same tensors expects its float32 work."""
    import mergesmith

    b, f1, _, _ = fam
    copy = tmp_path / "copy.yml"
    copy.write_text(
        f"slices:\n  - sources:\n      - model: {f1}\n        layer_range: [0, 2]\nmerge_method: passthrough\n"
    )
    plan = mergesmith.plan_merge(str(copy))
    largest = max(t.numel * t.out_dtype.itemsize for t in plan.tasks)
    assert largest <= plan.peak_bytes_estimate <= 2 * largest
    merge = mergesmith.plan_merge(str(write_recipe(tmp_path, fam)))
    assert merge.peak_bytes_estimate > 4 * largest


def test_large_copies_stream_in_row_blocks(tmp_path, fam, monkeypatch):
    """A passthrough copies large tensors a block of rows at a time (memory of a block, not of the tensor), and
    the output holds the source's bytes."""
    from safetensors.torch import load_file

    import mergesmith.plan
    from mergesmith.io.index import ModelIndex

    monkeypatch.setattr(mergesmith.plan, "BLOCK_ELEMENTS", 1000)
    reads, real = [], ModelIndex.read

    def spy(self, name, rows=None, take=None):
        reads.append((name, rows))
        return real(self, name, rows=rows, take=take)

    monkeypatch.setattr(ModelIndex, "read", spy)
    _, f1, _, _ = fam
    r = tmp_path / "copy.yml"
    r.write_text(
        f"slices:\n  - sources:\n      - model: {f1}\n        layer_range: [0, 2]\nmerge_method: passthrough\n"
    )
    assert cli("run", r, tmp_path / "o", "--quiet") == 0
    src = {}
    for f in sorted(Path(f1).glob("*.safetensors")):
        src.update(load_file(f))
    out = {}
    for f in sorted((tmp_path / "o").glob("*.safetensors")):
        out.update(load_file(f))
    assert out.keys() == src.keys()
    for k, v in src.items():
        assert torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)), k
    big = [n for n, v in src.items() if v.dim() >= 2 and v.numel() > 1000]
    assert big
    for n in big:
        rows = [rw for name, rw in reads if name == n]
        per = 1000 // (src[n].numel() // src[n].shape[0])
        assert rows and all(rw is not None and rw[1] - rw[0] <= max(1, per) for rw in rows), n
