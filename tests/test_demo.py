"""The bundled tiny family and the demo: what a newcomer sees first."""

import json

import pytest
import torch

from mergesmith.demo import recipe_path, tiny_dir
from mergesmith.skills import SKILLS

NAMES = ("base", *SKILLS)


def test_bundled_checkpoints_are_small_bf16_and_chat():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    total = sum(f.stat().st_size for n in NAMES for f in (tiny_dir() / n).iterdir())
    assert total <= 20_000_000
    tok = AutoTokenizer.from_pretrained(tiny_dir() / "addition")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir() / "addition")
    assert type(model).__name__ == "MistralForCausalLM" and model.dtype == torch.bfloat16
    assert not model.config.tie_word_embeddings
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip() == "3 + 4 makes 7"


def test_demo_end_to_end(tmp_path, capsys):
    from mergesmith.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "demo"), "--json"])
    assert e.value.code == 0
    models = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert list(models) == [*NAMES, "della_linear"]
    base, merged = models["base"], models["della_linear"]
    for skill in SKILLS:
        expert = models[skill]
        assert expert["accuracy"][skill] >= 0.8, (skill, expert["accuracy"])  # each fine-tune learned its skill
        assert base["accuracy"][skill] <= 0.1, (skill, base["accuracy"])  # which the base cannot do in chat
        assert merged["token_accuracy"][skill] > base["token_accuracy"][skill]  # the merge beats the base
    shares = [
        (merged["token_accuracy"][s] - base["token_accuracy"][s])
        / (models[s]["token_accuracy"][s] - base["token_accuracy"][s])
        for s in SKILLS
    ]
    assert sum(shares) / len(shares) >= 0.30
    assert (tmp_path / "demo" / "della_linear" / "model.safetensors").exists()


def test_example_recipe_is_the_seed_recipe_with_only_paths_changed():
    from pathlib import Path

    seed = Path(__file__).resolve().parents[2] / "shared" / "reference" / "stellar-odyssey-recipe.yml"
    if not seed.exists():
        pytest.skip("reference recipe not beside the checkout")
    mine = recipe_path().read_text().splitlines()
    theirs = seed.read_text().splitlines()
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        if "model:" in b:
            assert a.split("model:")[0] == b.split("model:")[0]
        else:
            assert a == b


def test_every_method_runs_on_the_tiny_family_and_is_scored(tmp_path):
    """`mergesmith demo --all-methods`: each method's example recipe merges the bundled models, the result loads,
    and eval scores it (the table in docs/methods.md)."""
    from mergesmith.demo import method_recipes, run_demo
    from mergesmith.methods import METHODS

    res = run_demo(tmp_path, all_methods=True)
    models = {m["name"]: m for m in res["models"]}
    merged = set(models) - set(NAMES)
    # every registered method except the breadcrumbs/dare_ties variants of methods already covered
    assert (
        set(method_recipes()) | {"linear", "task_arithmetic", "ties", "dare_linear", "della", "della_linear"} == merged
    )
    assert merged >= set(METHODS) - {"breadcrumbs", "breadcrumbs_ties", "dare_ties"}
    for name in merged:
        m = models[name]
        assert all(0 <= m["token_accuracy"][s] <= 1 for s in SKILLS) and m["perplexity"] < 1000, (name, m)
    base = models["base"]
    # slerp toward the addition expert moves addition, and the three-expert means move every skill
    assert models["slerp"]["token_accuracy"]["addition"] > base["token_accuracy"]["addition"] + 0.1
    for name in ("karcher", "sce", "multislerp"):
        assert all(models[name]["token_accuracy"][s] > base["token_accuracy"][s] for s in ("reverse", "sort")), name
    # the frankenmerge has 6 layers
    cfg = json.loads((tmp_path / "passthrough" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
