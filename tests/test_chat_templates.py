"""Named chat templates render through transformers' apply_chat_template as their model families expect."""

import json

import pytest

from mergesmith.chat_templates import TEMPLATES
from helpers import run_recipe
from mergesmith.demo import tiny_dir

# EXAONE's turn format, written out by hand: a system turn (an empty one when the conversation has none), user
# turns end with a newline, the others with [|endofturn|] and a newline
EXAONE_CHAT = [
    (
        [{"role": "user", "content": "What is 3 + 4?"}],
        True,
        "[|system|][|endofturn|]\n[|user|]What is 3 + 4?\n[|assistant|]",
    ),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
        False,
        "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello.[|endofturn|]\n[|user|]Bye\n",
    ),
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir() / "base")


@pytest.mark.parametrize("messages,generation,expect", EXAONE_CHAT)
def test_exaone_renders_its_turn_format(tokenizer, messages, generation, expect):
    text = tokenizer.apply_chat_template(
        messages, chat_template=TEMPLATES["exaone"], tokenize=False, add_generation_prompt=generation
    )
    assert text == expect


def test_a_recipe_naming_exaone_writes_a_template_transformers_renders(tmp_path):
    from transformers import AutoTokenizer

    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny_dir() / 'addition'}\n    parameters:\n"
        "      weight: 1\ndtype: bfloat16\nchat_template: exaone\n"
    )
    run_recipe(str(recipe), str(tmp_path / "out"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages, generation, expect = EXAONE_CHAT[0]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) == expect
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATES["exaone"]
