"""extract-lora with mergekit-extract-lora's options: filters, modules saved whole, embedding LoRA, the singular value
threshold, and adapters PEFT loads (checked with PEFT and float64 SVDs written here, not with mergesmith's reader)."""

import json

import pytest
import torch

from helpers import make_mistral, read_folder
from mergesmith.cli import main

import peft  # noqa: F401,E402 - a dev dependency: the tests must run, not skip

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A float32 base and a fine-tune in which every tensor moved (norms, embeddings and head included)."""
    root = tmp_path_factory.mktemp("extract")
    sd = make_mistral(root / "base", seed=3, layers=2, dtype=torch.float32)
    make_mistral(root / "ft", seed=4, layers=2, dtype=torch.float32, from_state=sd, noise=0.02)
    return root / "base", root / "ft"


def extract(out, ft, base, *args) -> int:
    with pytest.raises(SystemExit) as e:
        main(["extract-lora", "--model", str(ft), "--base-model", str(base), "--out-path", str(out), *map(str, args)])
    return e.value.code


def adapter(out):
    from safetensors.torch import load_file

    return json.loads((out / "adapter_config.json").read_text()), load_file(str(out / "adapter_model.safetensors"))


def lora_modules(tensors) -> set:
    return {k[len("base_model.model.") :].rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}


def peft_load(base, out):
    """base + adapter by PEFT, and PEFT's own report of the adapter keys it missed or did not expect."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(out))
    check = pm.load_adapter(str(out), adapter_name="check")
    pm.set_adapter("default")
    return pm.eval(), check


def test_full_rank_adapter_loads_in_peft_with_every_key_and_gives_the_fine_tunes_logits(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ft = pair
    out = tmp_path / "a"
    assert extract(out, ft, base, "--max-rank", 64) == 0
    cfg, tensors = adapter(out)
    pm, check = peft_load(base, out)
    assert check.missing_keys == [] and check.unexpected_keys == []
    # mergekit's defaults: every linear weight as LoRA; embeddings, head and norms (all changed here) saved whole
    assert lora_modules(tensors) == {
        f"model.layers.{i}.{p}.{m}" for i in range(2) for p, ms in (("self_attn", ATTN), ("mlp", MLP)) for m in ms
    }
    norms = {f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(cfg["modules_to_save"]) == {"model.embed_tokens", "lm_head", "model.norm"} | norms
    x = torch.tensor([[1, 7, 42, 9, 300, 5]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32)(x).logits
        got = pm(x).logits
    assert float((got - want).abs().max()) < 1e-4
    merged = pm.merge_and_unload().state_dict()
    for name, w in read_folder(ft).items():
        assert torch.allclose(merged[name], w, rtol=0, atol=1e-5), name


@pytest.mark.parametrize(
    "args,want,norms",
    [
        (["-i", "self_attn", "-e", r"layers\.1\."], {f"model.layers.0.self_attn.{m}" for m in ATTN}, set()),
        (
            ["--include-regex", "down_proj", "--include-regex", "q_proj"],
            {f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.q_proj")},
            set(),
        ),
        (
            ["--exclude-regex", "mlp", "-e", "layers.0"],
            {f"model.layers.1.self_attn.{m}" for m in ATTN},
            {
                "model.norm.weight",
                "model.layers.1.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            },
        ),
    ],
)
def test_include_and_exclude_regexes_select_the_modules(pair, tmp_path, args, want, norms):
    base, ft = pair
    out = tmp_path / "a"
    assert extract(out, ft, base, "--max-rank", 4, *args) == 0
    cfg, tensors = adapter(out)
    assert lora_modules(tensors) == want
    assert set(cfg["target_modules"]) == want
    # as mergekit: norms follow the filters; embeddings and head are saved whole unless an exclude names them
    saved = {k[len("base_model.model.") :] for k in tensors if ".lora_" not in k}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= saved
    assert {n for n in saved if "norm" in n} == norms


def test_an_exclude_regex_keeps_embeddings_and_head_out(pair, tmp_path):
    base, ft = pair
    out = tmp_path / "a"
    assert extract(out, ft, base, "--max-rank", 4, "-e", "embed_tokens|lm_head", "--skip-undecomposable") == 0
    cfg, tensors = adapter(out)
    assert cfg["modules_to_save"] is None
    assert not any("embed" in k or "lm_head" in k or "norm" in k for k in tensors)


def test_save_module_keeps_the_whole_tensor_and_peft_loads_the_fine_tunes_values(tmp_path, fam):
    base, ft = fam[0], fam[1]  # bf16, so "exact" means the fine-tune's very bits
    out = tmp_path / "a"
    assert (
        extract(
            out, ft, base, "--max-rank", 2, "--save-module", "lm_head", "--save-module", "model.layers.0.mlp.down_proj"
        )
        == 0
    )
    cfg, tensors = adapter(out)
    want = read_folder(ft)
    for name in ("lm_head.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(tensors[f"base_model.model.{name}"], want[name])
    assert {"lm_head", "model.layers.0.mlp.down_proj"} <= set(cfg["modules_to_save"])
    assert "model.layers.0.mlp.down_proj" not in lora_modules(tensors)
    assert "model.layers.1.mlp.down_proj" in lora_modules(tensors)
    pm, check = peft_load(base, out)
    assert check.missing_keys == [] and check.unexpected_keys == []
    merged = pm.merge_and_unload().state_dict()
    for name in ("lm_head.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(merged[name], want[name].float()), name


def test_embed_lora_reproduces_the_embedding_delta_within_the_rank_bound(pair, tmp_path):
    base, ft = pair
    out = tmp_path / "a"
    r = 5
    assert extract(out, ft, base, "--max-rank", r, "--embed-lora") == 0
    cfg, tensors = adapter(out)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (r, 320)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (64, r)
    assert "base_model.model.lm_head.lora_A.weight" in tensors  # the head is a linear layer
    assert not any(m in (cfg["modules_to_save"] or []) for m in ("model.embed_tokens", "lm_head", "embed_tokens"))
    pm, check = peft_load(base, out)
    assert check.missing_keys == [] and check.unexpected_keys == []
    merged = pm.merge_and_unload().state_dict()
    b, f = read_folder(base), read_folder(ft)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        d = f[name].double() - b[name].double()
        s = torch.linalg.svdvals(d)
        bound = float(s[r:].pow(2).sum().sqrt())  # Eckart-Young: the best rank-r error
        err = float((merged[name].double() - b[name].double() - d).norm())
        assert err == pytest.approx(bound, rel=1e-4), name


def known_spectrum(n: int, values) -> torch.Tensor:
    """An n x n matrix whose singular values are `values` (then zeros): U diag(s) V^T with random orthogonal U, V."""
    g = torch.Generator().manual_seed(11)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.zeros(n, dtype=torch.float64)
    s[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return (U * s) @ V.T


@pytest.mark.parametrize("eps,rank", [(0.5, 3), (0.1, 4), (4.0, 1)])
def test_sv_epsilon_drops_the_singular_values_at_or_below_it(tmp_path, eps, rank):
    name = "model.layers.0.self_attn.q_proj.weight"
    sd = make_mistral(tmp_path / "base", seed=2, layers=1, dtype=torch.float32)
    d = known_spectrum(64, [5.0, 3.0, 1.0, 0.2, 0.05])
    sd[name] = sd[name] + d.float()
    make_mistral(tmp_path / "ft", seed=2, layers=1, dtype=torch.float32, from_state=sd)
    out = tmp_path / "a"
    assert extract(out, tmp_path / "ft", tmp_path / "base", "--max-rank", 64, "--sv-epsilon", eps) == 0
    cfg, tensors = adapter(out)
    A = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    B = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert A.shape[0] == rank and cfg["r"] == rank
    U, S, Vh = torch.linalg.svd(d)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    assert torch.allclose((B @ A).double(), best, atol=1e-4)
    assert lora_modules(tensors) == {name[: -len(".weight")]}  # nothing else moved, nothing else written


def test_unchanged_norms_and_embeddings_are_not_saved_and_skip_undecomposable_leaves_a_norm_out(tmp_path, capsys):
    sd = make_mistral(tmp_path / "base", seed=2, layers=1, dtype=torch.float32)
    sd["model.norm.weight"] += 0.5
    sd["model.layers.0.mlp.up_proj.weight"] += 0.1
    make_mistral(tmp_path / "ft", seed=2, layers=1, dtype=torch.float32, from_state=sd)
    out = tmp_path / "a"
    assert extract(out, tmp_path / "ft", tmp_path / "base", "--max-rank", 2) == 0
    cfg, tensors = adapter(out)
    assert cfg["modules_to_save"] == ["model.norm"]
    assert torch.equal(tensors["base_model.model.model.norm.weight"], sd["model.norm.weight"])
    assert extract(tmp_path / "b", tmp_path / "ft", tmp_path / "base", "--max-rank", 2, "--skip-undecomposable") == 0
    cfg, tensors = adapter(tmp_path / "b")
    assert cfg["modules_to_save"] is None and lora_modules(tensors) == {"model.layers.0.mlp.up_proj"}
    assert "model.norm.weight" in capsys.readouterr().err  # the warning names what the adapter lacks


def test_on_the_tiny_family_the_whole_delta_error_is_the_svd_bound(tmp_path):
    """At rank 8 the adapter can do no better than the best rank-8 approximation of every linear weight's delta
    with everything else exact; it reaches that (mergekit 0.1.5 reaches 0.3947 here: docs/tokenizers-and-lora.md)."""
    from mergesmith.demo import tiny_dir

    base, ft = tiny_dir() / "base", tiny_dir() / "addition"
    out = tmp_path / "a"
    assert extract(out, ft, base, "--max-rank", 8) == 0
    pm, check = peft_load(base, out)
    assert check.missing_keys == [] and check.unexpected_keys == []
    merged = pm.merge_and_unload().state_dict()
    b, f = read_folder(base), read_folder(ft)
    num = den = bound = 0.0
    for name, w in f.items():
        d = w.double() - b[name].double()
        den += float(d.pow(2).sum())
        num += float((merged[name].double() - b[name].double() - d).pow(2).sum())
        if name.endswith("_proj.weight"):
            bound += float(torch.linalg.svdvals(d)[8:].pow(2).sum())
    err = (num / den) ** 0.5
    assert err == pytest.approx((bound / den) ** 0.5, rel=1e-3)
    assert err < 0.395


def test_mergekit_option_names_parse(pair, tmp_path, capsys):
    base, ft = pair
    out = tmp_path / "a"
    assert (
        extract(
            out,
            ft,
            base,
            "--max-rank",
            3,
            "--sv-epsilon",
            0,
            "--no-embed-lora",
            "--save-module",
            "norm",
            "-i",
            "proj",
            "-e",
            r"layers\.1\.",
            "--skip-undecomposable",
            "--distribute-scale",
            "--no-cuda",
            "--lora-merge-cache",
            tmp_path / "cache",
            "-v",
        )
        == 0
    )
    cfg, tensors = adapter(out)
    assert cfg["r"] == 3 and lora_modules(tensors) == {
        f"model.layers.0.{p}.{m}" for p, ms in (("self_attn", ATTN), ("mlp", MLP)) for m in ms
    }
    # PEFT wraps every module whose name ends with "norm": all of them are saved, so none is missing
    assert "norm" in cfg["modules_to_save"]
    assert {k for k in tensors if "norm" in k} == {
        f"base_model.model.{n}.weight"
        for n in (
            "model.norm",
            "model.layers.0.input_layernorm",
            "model.layers.0.post_attention_layernorm",
            "model.layers.1.input_layernorm",
            "model.layers.1.post_attention_layernorm",
        )
    }
    # mergesmith's own names still work: positional OUT, --base, --rank
    with pytest.raises(SystemExit) as e:
        main(["extract-lora", str(tmp_path / "b"), "--model", str(ft), "--base", str(base), "--rank", "2"])
    assert e.value.code == 0 and adapter(tmp_path / "b")[0]["r"] == 2


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--out-path", "elsewhere"], "differ"),
        (["-i", "("], "--include-regex '(' is not a regular expression"),
        (["--sv-epsilon", "-1"], "--sv-epsilon"),
        (["--max-rank", "0"], "--max-rank 0"),
        (["--save-module", "self_attn"], "--save-module self_attn: it names model.layers.0.self_attn, which holds"),
        (["--save-module", "no_such_module"], "--save-module no_such_module: no module of --model"),
    ],
)
def test_bad_options_are_one_line(pair, tmp_path, capsys, args, msg):
    base, ft = pair
    with pytest.raises(SystemExit) as e:
        main(["extract-lora", str(tmp_path / "a"), "--model", str(ft), "--base", str(base), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("embed_lora", [[], ["--embed-lora"]])
def test_a_model_with_tied_embeddings_keeps_its_head_tied_to_the_saved_embedding(tmp_path, embed_lora):
    """No lm_head.weight on disk, but PEFT's lm_head module must get the fine-tune's embedding too; an embedding LoRA
    on both tied ends would be merged twice, so they are saved whole even with --embed-lora."""
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    m = MistralForCausalLM(cfg)
    m.save_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(str(tmp_path / "ft"))
    out = tmp_path / "a"
    assert extract(out, tmp_path / "ft", tmp_path / "base", "--max-rank", 32, *embed_lora) == 0
    pm, check = peft_load(tmp_path / "base", out)
    assert check.missing_keys == [] and check.unexpected_keys == []
    x = torch.tensor([[1, 5, 9, 3, 60]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ft"))(x).logits
        assert float((pm(x).logits - want).abs().max()) < 1e-4
        assert float((pm.merge_and_unload()(x).logits - want).abs().max()) < 1e-4
