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
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == "3 + 4 makes 7"


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
    shares = [(merged["token_accuracy"][s] - base["token_accuracy"][s])
              / (models[s]["token_accuracy"][s] - base["token_accuracy"][s]) for s in SKILLS]
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
