"""Recipe parsing: mergekit's schema verbatim, lines in messages, typos warned, real errors refused."""

import logging
from pathlib import Path

import pytest

from mergesmith.errors import MergeError
from mergesmith.methods import METHODS
from mergesmith.params import ParameterResolver, layer_index, layer_t
from mergesmith.recipe import parse_recipe

SEED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "stellar-odyssey-recipe.yml"
SEED_TEXT = r"""models:
  - model: C:\Users\\Downloads\Mergekit-Fixed\mergekit\Sao10K_MN-12B-Lyra-v4
    parameters:
      weight: 0.3
      density: 0.25
  - model: C:\Users\\Downloads\Mergekit-Fixed\mergekit\nothingiisreal_MN-12B-Starcannon-v2
    parameters:
      weight: 0.1
      density: 0.4
  - model: C:\Users\\Downloads\Mergekit-Fixed\mergekit\Gryphe_Pantheon-RP-1.5-12b-Nemo
    parameters:
      weight: 0.4
      density: 0.5
merge_method: della_linear
base_model: C:\Users\\Downloads\Mergekit-Fixed\mergekit\mistralai_Mistral-Nemo-Base-2407
parameters:
  epsilon: 0.05
  lambda: 1
merge_method: della_linear
dtype: bfloat16
"""


def test_seed_recipe_parses_verbatim(caplog):
    text = SEED.read_text() if SEED.exists() else SEED_TEXT
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        r = parse_recipe(text, "seed.yml")
    c = r.config
    assert c.merge_method == "della_linear"
    assert c.models[0].model == r"C:\Users\\Downloads\Mergekit-Fixed\mergekit\Sao10K_MN-12B-Lyra-v4"
    assert c.base_model.endswith(r"mergekit\mistralai_Mistral-Nemo-Base-2407")
    assert [m.parameters["weight"] for m in c.models] == [0.3, 0.1, 0.4]
    assert c.parameters == {"epsilon": 0.05, "lambda": 1}
    assert c.dtype == "bfloat16"
    assert any("'merge_method' is given twice (lines 14 and 19)" in m for m in caplog.messages)
    assert r.line("models", 1, "parameters", "density") == 9


def test_duplicate_key_with_different_values_names_both_lines():
    text = SEED_TEXT.replace("merge_method: della_linear\ndtype", "merge_method: ties\ndtype")
    with pytest.raises(
        MergeError,
        match=r"seed.yml:19: 'merge_method' is given twice with different values "
        r"\(line 14: 'della_linear', line 19: 'ties'\)",
    ):
        parse_recipe(text, "seed.yml")


def test_unknown_keys_warn_with_line_and_suggestion(caplog):
    text = "merge_method: linear\ndype: float16\nrandom_seed: 3\nname: x\nmodels:\n  - model: a\n    paramters: {}\n"
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        r = parse_recipe(text, "r.yml")
    msgs = "\n".join(caplog.messages)
    assert "r.yml:2: unknown key 'dype' (did you mean 'dtype'?)" in msgs
    assert "r.yml:3: unknown key 'random_seed'" in msgs
    assert "r.yml:4: unknown key 'name'" in msgs
    assert "r.yml:7: unknown key 'paramters' (did you mean 'parameters'?)" in msgs
    assert r.config.dtype is None
    with pytest.raises(MergeError, match=r"r.yml:2: unknown key 'dype'.*--strict"):
        parse_recipe(text, "r.yml", strict=True)


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("merge_method: linear\nmodels: 3\n", r"r.yml:2: 'models' has a wrong value 3"),
        ("merge_method: [a]\nmodels:\n  - model: a\n", r"r.yml:1: 'merge_method' has a wrong value"),
        ("merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n", r"r.yml:3: 'models.0.model' is required"),
        ("models:\n  - model: a\n", r"no 'merge_method:'"),
        ("merge_method: linear\nmodels:\n  - model: a\n dtype: x\n", r"r.yml:4:\d+: malformed YAML"),
        ("merge_method: linear\n", r"exactly one of 'models:' or 'slices:'"),
        (
            "merge_method: linear\nmodels:\n  - model: a\ndtype: bfloat17\n",
            r"r.yml:4: dtype 'bfloat17' is not a dtype "
            r"\(did you mean 'bfloat16'\?\)",
        ),
        ("- a\n- b\n", r"a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_are_one_line_errors(text, pattern):
    with pytest.raises(MergeError, match=pattern) as e:
        parse_recipe(text, "r.yml")
    assert "\n" not in str(e.value)


def test_layer_index_from_names_of_many_families():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("encoder.layer.7.output.dense.bias") == 7
    assert layer_index("blocks.0.norm1.weight") == 0
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert layer_t("model.layers.0.x", 4) == 0 and layer_t("model.layers.3.x", 4) == 1
    assert layer_t("model.layers.0.x", 1) == 1.0  # mergekit: a single layer sits at t = 1
    assert layer_t("model.norm.weight", 4) == 0


GRADIENT_RECIPE = """merge_method: ties
base_model: base
models:
  - model: base
  - model: a
    parameters:
      weight: [0, 1]
      density:
        - filter: mlp
          value: [0.2, 0.8]
        - filter: self_attn
          value: 0.5
  - model: b
    parameters:
      weight: 0.25
parameters:
  density: 0.9
  normalize: false
  lambda:
    - filter: lm_head
      value: 2.0
    - value: 1.5
"""


def test_gradients_filters_and_precedence_as_mergekit():
    r = parse_recipe(GRADIENT_RECIPE, "g.yml")
    res = ParameterResolver(r, METHODS["ties"])

    def get(name, n_layers=4):
        return res.resolve(name, layer_t(name, n_layers), ["a", "b"], "base")

    shared, (a, b) = get("model.layers.1.mlp.up_proj.weight")
    assert a["weight"] == pytest.approx(1 / 3)  # gradient [0, 1] at t = 1/3
    assert a["density"] == pytest.approx(0.2 + 0.6 / 3)  # filter 'mlp' -> gradient
    assert b["weight"] == 0.25 and b["density"] == 0.9  # falls back to the global value
    assert shared == {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.5}
    _, (a, _) = get("model.layers.3.self_attn.q_proj.weight")
    assert a["weight"] == 1.0 and a["density"] == 0.5
    _, (a, _) = get("model.layers.2.input_layernorm.weight")
    assert a["density"] == 0.9  # no filter matches in the model's list: falls through to the global value
    shared, (a, _) = get("lm_head.weight")
    assert shared["lambda"] == 2.0 and a["weight"] == 0.0  # non-layer tensors sit at t = 0


def test_gradient_of_three_points_interpolates_piecewise():
    r = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [0, 1, 0.5]\n", "g.yml"
    )
    res = ParameterResolver(r, METHODS["linear"])
    got = [
        res.resolve(f"model.layers.{i}.w", layer_t(f"model.layers.{i}.w", 5), ["a"], None)[1][0]["weight"]
        for i in range(5)
    ]
    assert got == pytest.approx([0, 0.5, 1, 0.75, 0.5])


def test_bad_parameter_value_names_its_line():
    r = parse_recipe(
        "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      weight: heavy\n", "p.yml"
    )
    res = ParameterResolver(r, METHODS["ties"])
    with pytest.raises(MergeError, match=r"p.yml:6: 'weight' must be a number, got 'heavy'"):
        res.resolve("x", 0, ["a"], "b")
