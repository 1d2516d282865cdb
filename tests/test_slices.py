"""`slices:` with layer_range: frankenmerges, per-slice merges, gradients and renamed layers."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import make_mistral, read_folder, run_recipe
from mergesmith.errors import MergeError

LAYER = re.compile(r"\.layers\.(\d+)\.")


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """Two unrelated 6-layer models of one shape, and a fine-tune of the first."""
    root = tmp_path_factory.mktemp("six")
    sd = make_mistral(root / "a", seed=1, layers=6)
    make_mistral(root / "b", seed=2, layers=6)
    make_mistral(root / "a_ft", seed=3, layers=6, from_state=sd, noise=0.02)
    return root


def _run(tmp_path, text, **kw):
    r = tmp_path / "recipe.yml"
    r.write_text(text)
    out = tmp_path / "out"
    run_recipe(str(r), str(out), **kw)
    return out


def test_frankenmerge_stacks_layers_byte_for_byte(six, tmp_path):
    out = _run(
        tmp_path,
        f"""
slices:
  - sources:
      - model: {six / "a"}
        layer_range: [0, 4]
  - sources:
      - model: {six / "b"}
        layer_range: [2, 6]
merge_method: passthrough
dtype: bfloat16
""",
    )
    got, a, b = read_folder(out), read_folder(six / "a"), read_folder(six / "b")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8
    layers = sorted({int(LAYER.search(n).group(1)) for n in got if LAYER.search(n)})
    assert layers == list(range(8))
    for name, t in got.items():
        m = LAYER.search(name)
        if m is None:  # embeddings from the first slice's model, final norm and lm_head from the last's
            src = a if "embed_tokens" in name else b
            assert torch.equal(t, src[name]), name
            continue
        i = int(m.group(1))
        src, j = (a, i) if i < 4 else (b, i - 4 + 2)
        want = src[name.replace(f".layers.{i}.", f".layers.{j}.")]
        assert t.dtype == want.dtype and torch.equal(t.view(torch.uint8), want.view(torch.uint8)), name  # bytes
    assert len(got) == len([n for n in a if not LAYER.search(n)]) + 8 * len([n for n in a if ".layers.0." in n])
    # it loads and runs in transformers, with the new depth
    code = (
        f"from transformers import AutoModelForCausalLM; import torch; "
        f"m = AutoModelForCausalLM.from_pretrained(r'{out}'); "
        f"assert m.config.num_hidden_layers == 8 and len(m.model.layers) == 8; "
        f"o = m(torch.tensor([[1, 2, 3]])).logits; assert torch.isfinite(o).all(); print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]


def test_repeated_layers_get_their_own_copies(six, tmp_path):
    out = _run(
        tmp_path,
        f"""
slices:
  - sources: [{{model: {six / "a"}, layer_range: [0, 3]}}]
  - sources: [{{model: {six / "a"}, layer_range: [1, 4]}}]
merge_method: passthrough
""",
    )
    got, a = read_folder(out), read_folder(six / "a")
    name = "model.layers.{}.mlp.down_proj.weight"
    # output layers 1 and 3 are both source layer 1, stored twice
    assert torch.equal(got[name.format(1)], a[name.format(1)]) and torch.equal(got[name.format(3)], a[name.format(1)])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6


@pytest.mark.parametrize("span", ["slice", "output"])
def test_slices_merge_with_a_method_and_gradients_run_per_slice(six, tmp_path, span):
    """linear over two slices; the weight gradient [0, 1] is evaluated over each slice's own layers (mergekit:
    t = k / (n - 1) within the slice) or with --gradient-span output over the 4 output layers, and layer_range
    offsets pick the source layers."""
    out = _run(
        tmp_path,
        f"""
slices:
  - sources:
      - model: {six / "a"}
        layer_range: [0, 3]
        parameters: {{weight: [0, 1]}}
      - model: {six / "a_ft"}
        layer_range: [3, 6]
        parameters: {{weight: 1}}
  - sources:
      - model: {six / "a"}
        layer_range: [5, 6]
        parameters: {{weight: [0, 1]}}
      - model: {six / "a_ft"}
        layer_range: [0, 1]
        parameters: {{weight: 1}}
merge_method: linear
dtype: float32
""",
        gradient_span=span,
    )
    got, a, f = read_folder(out), read_folder(six / "a"), read_folder(six / "a_ft")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    leaf = "self_attn.q_proj.weight"
    # (output layer, a's layer, a_ft's layer, t)
    ts = [0.0, 0.5, 1.0, 1.0] if span == "slice" else [0.0, 1 / 3, 2 / 3, 1.0]
    for (o, ia, ib), t in zip([(0, 0, 3), (1, 1, 4), (2, 2, 5), (3, 5, 0)], ts):
        xa = a[f"model.layers.{ia}.{leaf}"].double().numpy()
        xb = f[f"model.layers.{ib}.{leaf}"].double().numpy()
        want = (t * xa + 1.0 * xb) / (t + 1.0)
        np.testing.assert_allclose(got[f"model.layers.{o}.{leaf}"].double().numpy(), want, rtol=0, atol=1e-6)
    # non-layer tensors: the first slice's sources for embeddings, the last slice's for the rest, t = 0
    emb = "model.embed_tokens.weight"
    np.testing.assert_allclose(got[emb].double().numpy(), f[emb].double().numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "recipe, message",
    [
        (
            "slices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 7]}}\nmerge_method: passthrough\n",
            r"recipe.yml:3: layer_range \[0, 7\] but .* has 6 layers",
        ),
        (
            "slices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
            "      - {{model: {b}, layer_range: [0, 2]}}\n"
            "merge_method: slerp\nbase_model: {ft}\nparameters: {{t: 0.5}}\n",
            r"recipe.yml:2: the base model .* is not among this slice's sources",
        ),
        (
            "slices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
            "      - {{model: {b}, layer_range: [0, 2]}}\n"
            "merge_method: passthrough\n",
            r"passthrough takes exactly 1 models, got 2",
        ),
        (
            "models:\n  - model: {a}\n  - model: {b}\n  - model: {ft}\nmerge_method: slerp\nbase_model: {a}\n"
            "parameters: {{t: 0.5}}\n",
            r"slerp takes exactly 1 models besides the base, got 2",
        ),
        (
            "models:\n  - model: {a}\n  - model: {b}\nmerge_method: slerp\nbase_model: {a}\n",
            r"missing required parameter 't'",
        ),
    ],
)
def test_slice_and_arity_errors_name_the_line(six, tmp_path, recipe, message):
    r = tmp_path / "recipe.yml"
    r.write_text(recipe.format(a=six / "a", b=six / "b", ft=six / "a_ft"))
    with pytest.raises(MergeError, match=message):
        run_recipe(str(r), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
