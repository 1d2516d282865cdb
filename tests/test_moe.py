"""Mixtures of experts from dense fine-tunes (`mergesmith moe`, mergekit-moe recipes): outputs that load and
generate, experts that are their source MLPs byte for byte, routers checked against references computed here."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from helpers import make_tokenizer, read_folder
from mergesmith.cli import main

PROMPTS = {  # per expert: positive prompts (and negative ones for the first)
    0: ["hello world", "merging models is fun"],
    1: ["the quick brown fox", "jumps over the lazy dog"],
    2: ["fun fox world", "lazy merging"],
}


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def refused(capsys, *args) -> str:
    """The CLI exits 2 with exactly one line (besides warnings), `error: ...`."""
    code = cli(*args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def save_family(root: Path, kind: str, n_ft: int = 3, **over) -> list:
    """A tiny base of `kind` (mistral, llama, qwen2, qwen3) in bf16 with a tokenizer, and n_ft fine-tunes (the
    base plus noise on every weight)."""
    import transformers

    classes = {
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[kind])
    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(over)
    torch.manual_seed(0)
    base = model_cls(cfg_cls(**kw))
    paths = []
    for i in range(n_ft + 1):
        m = base if i == 0 else model_cls(cfg_cls(**kw))
        if i:
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for (_, p), (_, q) in zip(m.named_parameters(), base.named_parameters()):
                    p.copy_(q + 0.05 * torch.randn(p.shape, generator=g))
        folder = root / ("base" if i == 0 else f"ft{i}")
        m.to(torch.bfloat16).save_pretrained(str(folder))
        make_tokenizer(folder)
        paths.append(folder)
    return paths


def write_recipe(path: Path, base, experts, **top) -> Path:
    data = {"base_model": str(base), "experts": experts, "dtype": "bfloat16", **top}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def expert(path, i, **kw):
    return {"source_model": str(path), "positive_prompts": PROMPTS[i], **kw}


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("mistral"), "mistral")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory, mistral):
    """A Mixtral of the three fine-tunes with mergekit's `hidden` gates (negative prompts for expert 0, a
    residual_scale for expert 2)."""
    root = tmp_path_factory.mktemp("mixtral")
    base, f1, f2, f3 = mistral
    recipe = write_recipe(
        root / "moe.yml",
        base,
        [expert(f1, 0, negative_prompts=PROMPTS[1]), expert(f2, 1), expert(f3, 2, residual_scale=0.5)],
        gate_mode="hidden",
        experts_per_token=2,
    )
    assert cli("moe", recipe, root / "out", "--quiet", "--random-seed", 3) == 0
    return root / "out"


def bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """got (bf16 in the file) is want rounded to bf16, up to one unit in the last place and float32 noise."""
    want = want.float()
    tol = want.abs() * 2**-7 + 1e-5
    assert ((got.float() - want).abs() <= tol).all(), (got.float() - want).abs().max()


def load(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, output_loading_info=True)
    return model.eval(), info


def generates(model, tok) -> None:
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4


def test_mixtral_loads_generates_and_holds_the_source_mlps(mistral, mixtral):
    from transformers import AutoTokenizer

    model, info = load(mixtral)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    generates(model, AutoTokenizer.from_pretrained(str(mixtral)))
    cfg = json.loads((mixtral / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (3, 2, 96)
    out, base = read_folder(mixtral), read_folder(mistral[0])
    for e, src in enumerate(mistral[1:]):
        sd = read_folder(src)
        for i in range(2):
            for w, proj in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
                got, want = (
                    out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"],
                    sd[f"model.layers.{i}.mlp.{proj}_proj.weight"],
                )
                assert got.dtype == want.dtype == torch.bfloat16
                if e == 2 and proj == "down":  # residual_scale 0.5: exact in bf16
                    assert torch.equal(got, want * 0.5)
                else:
                    assert got.view(torch.int16).equal(want.view(torch.int16))  # the same bytes
    for name, t in base.items():  # attention, norms, embeddings and head: the base's bytes
        if ".mlp." not in name:
            assert out[name].view(torch.int16).equal(t.view(torch.int16)), name
    assert not any(".mlp." in n for n in out)


def test_hidden_router_is_mergekits_formula_on_a_float64_base(mistral, mixtral):
    """gate_mode hidden: for layer i, the mean over an expert's positive prompts of the hidden state entering
    layer i at the prompt's last token (BOS text + prompt), minus the same of its negative prompts, unit length;
    the reference runs the base in float64 through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mistral[0]))
    base = AutoModelForCausalLM.from_pretrained(str(mistral[0]), dtype=torch.float64).eval()

    def mean_state(prompts, layer):
        states = []
        for p in prompts:
            ids = tok(tok.bos_token + p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                hs = base(input_ids=ids, output_hidden_states=True).hidden_states
            states.append(hs[layer][0, -1])
        return torch.stack(states).mean(0)

    out = read_folder(mixtral)
    for i in range(2):
        want = []
        for e in range(3):
            v = mean_state(PROMPTS[e], i) - (mean_state(PROMPTS[1], i) if e == 0 else 0)
            want.append(v / v.norm())
        bf16_close(out[f"model.layers.{i}.block_sparse_moe.gate.weight"], torch.stack(want))


def test_random_and_cheap_embed_gates_follow_mergekit(tmp_path, mistral):
    base, f1, f2, f3 = mistral
    emb = read_folder(base)["model.embed_tokens.weight"].float()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    experts = [expert(f1, 0), expert(f2, 1), expert(f3, 2)]
    for mode in ("random", "uniform_random", "cheap_embed"):
        r = write_recipe(tmp_path / f"{mode}.yml", base, experts, gate_mode=mode)
        assert cli("moe", r, tmp_path / mode, "--quiet", "--random-seed", 11, "--no-report") == 0
        got = torch.stack(
            [read_folder(tmp_path / mode)[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(2)]
        )
        torch.manual_seed(11)  # mergekit draws from torch's generator after --random-seed
        if mode == "random":
            want = torch.randn(2, 3, 64)
        elif mode == "uniform_random":
            want = torch.rand(2, 3, 64) * 2 / math.sqrt(64) - 1 / math.sqrt(64)
        else:  # the sum of every prompt token's embedding (BOS text included), unit length, in every layer
            vecs = []
            for e in range(3):
                ids = [t for p in PROMPTS[e] for t in tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]]
                v = emb[ids].sum(0)
                vecs.append(v / v.norm())
            want = torch.stack(vecs)[None].expand(2, 3, 64)
        bf16_close(got, want)


EVALS = {0: ["hello fun world"], 1: ["the lazy fox jumps"], 2: ["merging world fox"]}


def report_is_what_transformers_routes(folder: Path, n: int) -> None:
    """routing_report.json's top-1 shares per expert and layer are those of the router logits of the output
    loaded by transformers, on the eval prompts (BOS text + prompt)."""
    from transformers import AutoTokenizer

    rep = json.loads((folder / "routing_report.json").read_text())
    assert rep["measured_on"] == "eval_prompts"
    model, _ = load(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    for e in range(n):
        ids = tok(tok.bos_token + EVALS[e][0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        shares = [float((lg.argmax(-1) == e).float().mean()) for lg in logits]
        assert rep["experts"][e]["tokens"] == ids.shape[1]
        assert rep["experts"][e]["top1_share_by_layer"] == pytest.approx(shares, abs=1e-9)


def test_qwen2_moe_with_a_shared_expert_and_llama_to_qwen_moe(tmp_path):
    from transformers import AutoTokenizer

    for kind in ("qwen2", "llama"):
        base, f1, f2, sh = save_family(tmp_path / kind, kind)
        r = write_recipe(
            tmp_path / f"{kind}.yml",
            base,
            [expert(f1, 0, eval_prompts=EVALS[0]), expert(f2, 1, eval_prompts=EVALS[1])],
            shared_experts=[expert(sh, 2)],
            experts_per_token=1,
        )
        out = tmp_path / f"{kind}-moe"
        assert cli("moe", r, out, "--quiet", *(["--calibrate"] if kind == "qwen2" else ["--no-report"])) == 0
        if kind == "qwen2":  # the mixture with its gated shared expert, as transformers computes it
            report_is_what_transformers_routes(out, 2)
        model, info = load(out)
        assert type(model).__name__ == "Qwen2MoeForCausalLM"
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        generates(model, AutoTokenizer.from_pretrained(str(out)))
        got, shared_src, b = read_folder(out), read_folder(sh), read_folder(base)
        for proj in ("gate", "up", "down"):
            assert (
                got[f"model.layers.1.mlp.shared_expert.{proj}_proj.weight"]
                .view(torch.int16)
                .equal(shared_src[f"model.layers.1.mlp.{proj}_proj.weight"].view(torch.int16))
            )
        assert got["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
        bias = got["model.layers.0.self_attn.k_proj.bias"]
        if kind == "llama":  # Qwen MoE attention always has q/k/v biases: zeros stand in for Llama's none
            assert bias.shape == (32,) and not bias.any()
        else:
            assert bias.view(torch.int16).equal(b["model.layers.0.self_attn.k_proj.bias"].view(torch.int16))


def test_qwen3_moe(tmp_path):
    from transformers import AutoTokenizer

    base, f1, f2 = save_family(tmp_path, "qwen3", n_ft=2)
    r = write_recipe(tmp_path / "q3.yml", base, [expert(f1, 0), expert(f2, 1)], experts_per_token=1)
    assert cli("moe", r, tmp_path / "out", "--quiet", "--no-report") == 0
    model, info = load(tmp_path / "out")
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    generates(model, AutoTokenizer.from_pretrained(str(tmp_path / "out")))
    got, src = read_folder(tmp_path / "out"), read_folder(f2)
    assert (
        got["model.layers.1.mlp.experts.1.up_proj.weight"]
        .view(torch.int16)
        .equal(src["model.layers.1.mlp.up_proj.weight"].view(torch.int16))
    )
    q_norm = "model.layers.1.self_attn.q_norm.weight"
    assert got[q_norm].equal(read_folder(base)[q_norm])


def test_calibrated_routers_and_the_report_agree_with_transformers(tmp_path, mistral):
    """--calibrate fits the routers on the positive prompts; the routing report (top-1 share per expert and
    layer) is what the output model, loaded by transformers, actually routes (two experts per token)."""
    base, f1, f2, f3 = mistral
    experts = [expert(f, i, eval_prompts=EVALS[i]) for i, f in enumerate((f1, f2, f3))]
    r = write_recipe(tmp_path / "cal.yml", base, experts, experts_per_token=2)
    assert cli("moe", r, tmp_path / "out", "--quiet", "--calibrate") == 0
    assert json.loads((tmp_path / "out" / "routing_report.json").read_text())["router"] == "calibrated"
    report_is_what_transformers_routes(tmp_path / "out", 3)
    assert "calibrate: true" in (tmp_path / "out" / "mergesmith_config.yml").read_text()


def test_the_mixture_holds_one_experts_mlp_at_a_time(tmp_path, mistral, monkeypatch):
    """--calibrate and the routing report run the mixture layer by layer; each expert's MLP weights are read when
    applied and dropped after, so at most one MLP's gate/up/down projections are alive at once: memory does not
    grow with the number of experts."""
    import weakref

    from mergesmith.io.index import ModelIndex

    alive, most, read = [], [0], ModelIndex.read

    def counting_read(self, name, *args, **kw):
        t = read(self, name, *args, **kw)
        if ".mlp." in name:
            alive[:] = [r for r in alive if r() is not None] + [weakref.ref(t)]
            most[0] = max(most[0], len(alive))
        return t

    monkeypatch.setattr(ModelIndex, "read", counting_read)
    base, f1, f2, f3 = mistral
    r = write_recipe(tmp_path / "m.yml", base, [expert(f, i) for i, f in enumerate((f1, f2, f3))])
    assert cli("moe", r, tmp_path / "out", "--quiet", "--calibrate") == 0
    assert (tmp_path / "out" / "routing_report.json").exists()
    assert most[0] == 3


def test_run_on_the_recipe_copy_rebuilds_the_same_bytes(tmp_path, mixtral):
    """`mergesmith run` takes an MoE recipe (here the output's own copy, with its seed) and rebuilds it."""
    copy = mixtral / "mergesmith_config.yml"
    assert "gate_mode: hidden" in copy.read_text()
    assert cli("run", copy, tmp_path / "again", "--quiet", "--seed", 3) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (mixtral / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(experts=[]), "has no experts"),
        (lambda d: d.pop("experts"), "has no experts"),
        (lambda d: d.update(gate_mode="hiden"), "unknown gate_mode 'hiden' (did you mean 'hidden'?)"),
        (lambda d: d["experts"][1]["positive_prompts"].append(7), "prompt 3 of experts[1].positive_prompts is 7"),
        (lambda d: d["experts"][0].update(negative_prompts="a lone string"), "must be a list of prompts"),
        (lambda d: d["experts"][0]["positive_prompts"].append({"prompt": "hi"}), "whose answer is not text"),
        (lambda d: d.update(experts_per_token=4), "experts_per_token 4 must lie in [1, 3]"),
        (lambda d: d.update(experts_per_token=True), "experts_per_token is true, not a number"),
        (lambda d: d.update(architecture="deepseek"), "DeepSeek MoE output needs"),
        (lambda d: d.update(architecture="qwen3"), "Qwen3 MoE is built from qwen3 models"),
        (
            lambda d: (
                d["experts"][2].update(source_model=d["experts"][0]["source_model"])
                or d["experts"][1].update(source_model=d["experts"][0]["source_model"])
            ),
            "every expert is",
        ),
        (lambda d: d["experts"][1].pop("positive_prompts"), "has no positive_prompts"),
        (lambda d: d["experts"][2]["positive_prompts"].append("fox " * 3000), "router prompts are short texts"),
    ],
)
def test_bad_moe_recipes_are_refused_in_one_line_before_any_work(tmp_path, mistral, capsys, change, message):
    base, f1, f2, f3 = mistral
    data = {"base_model": str(base), "gate_mode": "hidden", "experts": [expert(f1, 0), expert(f2, 1), expert(f3, 2)]}
    data["experts"] = [dict(e, positive_prompts=list(e["positive_prompts"])) for e in data["experts"]]
    change(data)
    r = tmp_path / "bad.yml"
    r.write_text(yaml.safe_dump(data, sort_keys=False))
    line = refused(capsys, "moe", r, tmp_path / "out", "--quiet")
    assert message in line, line
    assert line.startswith(f"error: {r.name}:")  # names the recipe (and the line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_an_expert_of_another_shape_is_refused(tmp_path, mistral, capsys):
    base, f1, f2, _ = mistral
    (other,) = save_family(tmp_path, "mistral", n_ft=0, intermediate_size=80)
    r = write_recipe(tmp_path / "r.yml", base, [expert(f1, 0), expert(other, 1)])
    capsys.readouterr()
    line = refused(capsys, "run", r, tmp_path / "out", "--quiet")
    assert "r.yml:" in line and "model.layers.0.mlp.gate_proj.weight is [80, 64], not [96, 64]" in line, line
    assert not (tmp_path / "out").exists()


def test_unknown_keys_warn_with_their_line_and_the_build_runs(tmp_path, mistral, capsys):
    base, f1, f2, _ = mistral
    r = write_recipe(
        tmp_path / "r.yml",
        base,
        [expert(f1, 0, postive_prompts=["x"]), expert(f2, 1)],
        gate_mode="cheap_embed",
        experts_per_token=1,
    )
    assert cli("moe", r, tmp_path / "out", "--quiet", "--load-in-4bit", "--no-report") == 0
    err = capsys.readouterr().err
    assert "unknown key 'postive_prompts' (did you mean 'positive_prompts'?)" in err and "r.yml:" in err
    assert "does not quantize" in err
    assert refused(capsys, "moe", r, tmp_path / "out2", "--strict").endswith("(refused under --strict)")


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path, mistral, mixtral, monkeypatch):
    """A build stopped midway leaves OUT_DIR.partial/ with its journal; the same command continues it (the seed
    from the journal) and the folder equals an uninterrupted build's."""
    from mergesmith import moe

    recipe = tmp_path / "r.yml"
    recipe.write_text((mixtral / "mergesmith_config.yml").read_text())
    real, calls = moe.tensor_value, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(moe, "tensor_value", flaky)
    with pytest.raises(KeyboardInterrupt):
        moe.build_moe(str(recipe), str(tmp_path / "out"), seed=3, quiet=True)
    assert (tmp_path / "out.partial").is_dir() and not (tmp_path / "out").exists()
    monkeypatch.setattr(moe, "tensor_value", real)
    b = moe.build_moe(str(recipe), str(tmp_path / "out"), quiet=True)
    assert b.resumed == 19 and b.plan.seed == 3
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (mixtral / "model.safetensors").read_bytes()


def test_demo_moe_routes_held_out_answers_to_their_expert(tmp_path):
    """The demo's MoE (routers calibrated on training chats only) sends >= 90% of each skill's held-out answer
    tokens to that skill's expert."""
    from helpers import run_recipe
    from mergesmith.demo import _variant, moe_row, routing_accuracy
    from mergesmith.skills import SKILLS, eval_set, is_held_out

    run_recipe(str(_variant("linear", tmp_path / "recipes" / "linear.yml")), str(tmp_path / "linear"))
    moe_row(tmp_path, 1, [])
    recipe = yaml.safe_load((tmp_path / "recipes" / "moe.yml").read_text())
    for s, e in zip(SKILLS, recipe["experts"]):  # the routers never saw a held-out prompt
        assert not any(is_held_out(s, p["prompt"]) for p in e["positive_prompts"])
        assert [p["prompt"] for p in e["eval_prompts"]] == [p for p, _ in eval_set(s)]
    acc = routing_accuracy(tmp_path / "moe")
    assert all(acc[s] >= 0.9 for s in SKILLS), acc


def test_plan_of_an_moe_recipe_describes_the_build(mixtral, capsys):
    """`mergesmith plan` on a mergekit-moe recipe checks it and says what `moe` would build (no merge_method)."""
    capsys.readouterr()
    assert cli("plan", mixtral.parent / "moe.yml") == 0
    out = capsys.readouterr().out
    assert "Mixtral" in out or "mixtral" in out, out
