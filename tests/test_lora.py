"""LoRA adapters made with PEFT: `base+adapter` inputs, and extract-lora back to an adapter PEFT loads."""

import json

import pytest
import torch

from helpers import make_mistral, read_folder, run_recipe
from mergesmith.cli import main
from mergesmith.errors import MergeError

import peft  # noqa: F401,E402 - a dev dependency: the tests must run, not skip

R, ALPHA = 4, 8


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A float32 base, a PEFT LoRA on q/v/o projections and the embeddings (random, non-zero B), and PEFT's own
    merge_and_unload of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    make_mistral(root / "base", seed=5, layers=2, dtype=torch.float32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    cfg = LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
        init_lora_weights=False,
        rank_pattern={"o_proj": 2},
        alpha_pattern={"o_proj": 3},
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)  # make the deltas clearly visible
    pm.save_pretrained(str(root / "adapter"))
    merged = pm.merge_and_unload()
    want = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    merged.save_pretrained(str(root / "peft_merged"))
    return root, want


def test_base_plus_lora_equals_peft_merge_and_unload(lora_setup, tmp_path):
    root, want = lora_setup
    r = tmp_path / "r.yml"
    r.write_text(
        f"merge_method: linear\nmodels:\n  - model: {root / 'base'}+{root / 'adapter'}\n"
        "    parameters: {weight: 1.0}\ndtype: float32\n"
    )
    run_recipe(str(r), str(tmp_path / "out"))
    got = read_folder(tmp_path / "out")
    base = read_folder(root / "base")
    changed = 0
    for name, w in want.items():
        if name not in got:
            continue
        assert torch.allclose(got[name], w, rtol=0, atol=1e-6), name
        changed += not torch.equal(base[name], w)
    assert changed == 2 * 3 + 1  # q, v, o in two layers, and the embeddings


def test_extract_lora_reproduces_the_adapter_and_loads_in_peft(lora_setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, want = lora_setup
    out = tmp_path / "extracted"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "extract-lora",
                str(out),
                "--model",
                str(root / "peft_merged"),
                "--base",
                str(root / "base"),
                "--rank",
                str(R),
            ]
        )
    assert e.value.code == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == R
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    pm = PeftModel.from_pretrained(base, str(out))
    merged = pm.merge_and_unload().state_dict()
    base_sd = read_folder(root / "base")
    for name in want:
        if name.endswith("proj.weight") and not torch.equal(want[name], base_sd[name]):
            d_want = want[name].double() - base_sd[name].double()
            d_got = merged[name].double() - base_sd[name].double()
            rel = float((d_got - d_want).norm() / d_want.norm())
            assert rel < 1e-3, (name, rel)
    # the embeddings are not a linear weight: saved whole, as mergekit does (the only other tensor that changed)
    assert not any("embed_tokens" in k for k in cfg["target_modules"])
    assert cfg["modules_to_save"] == ["model.embed_tokens"]
    # a forward pass through the PEFT-loaded adapter matches PEFT's own merge
    x = torch.tensor([[1, 5, 9, 3]])
    ref = AutoModelForCausalLM.from_pretrained(str(root / "peft_merged"))
    with torch.no_grad():
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "base")), str(out))(x).logits
        exp = ref(x).logits
    assert torch.allclose(got, exp, atol=1e-4), float((got - exp).abs().max())


def test_extract_lora_with_energy_picks_smaller_ranks(lora_setup, tmp_path):
    root, _ = lora_setup
    from mergesmith.lora import extract_lora

    res = extract_lora(
        str(root / "peft_merged"), str(root / "base"), tmp_path / "e", rank=16, energy=0.999, progress=False
    )
    # the true deltas have rank 4 (q, v) and 2 (o): an energy threshold finds them, not the cap of 16
    assert {m.split(".")[-1]: r for m, r in res.modules.items()} == {"q_proj": 4, "v_proj": 4, "o_proj": 2}
    assert max(res.errors.values()) < 1e-3
    assert res.saved == ["model.embed_tokens.weight"] and res.left_out == []


def test_bad_adapter_is_one_line(lora_setup, tmp_path):
    root, _ = lora_setup
    r = tmp_path / "r.yml"
    r.write_text(
        f"merge_method: linear\nmodels:\n  - model: {root / 'base'}+{tmp_path}\n    parameters: {{weight: 1.0}}\n"
    )
    with pytest.raises(MergeError, match=r"r.yml:3: adapter .* has no adapter_config.json"):
        run_recipe(str(r), str(tmp_path / "out"))
