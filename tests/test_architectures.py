"""`slices:` and `modules:` on many architectures, each a tiny random model built here with transformers.

Single-stack models (decoder LLMs, MoEs, BERT, ViT): a slice run that repeats a layer loads in transformers with no
missing or unexpected keys, every config key counting the layers follows, and each output layer holds its source
layer's bytes. Models with two layer stacks (T5, Whisper, CLIP, a Llava-style VLM): `slices:` is refused (a
layer_range could mean either stack, as in mergekit), and `modules:` slices one stack and leaves the other as it was.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from helpers import read_folder
from mergesmith.cli import main
from mergesmith.stacks import anatomy, update_counts

V, H = 128, 32  # vocabulary and width of every tiny model
OUT_LAYERS = [0, 1, 1, 2]  # the source layer of each output layer: slices [0, 2) + [1, 3)


def _lm(**kw):
    return dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )


def _vision(layers: int, **kw):
    return dict(
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        **kw,
    )


# name: (config class, its arguments, model class, the Auto class that loads it, config.json keys counting layers)
SINGLE = {
    "llama": ("LlamaConfig", _lm(), "LlamaForCausalLM", "AutoModelForCausalLM", ["num_hidden_layers"]),
    "qwen2": ("Qwen2Config", _lm(), "Qwen2ForCausalLM", "AutoModelForCausalLM", ["num_hidden_layers"]),
    "qwen3": ("Qwen3Config", _lm(head_dim=8), "Qwen3ForCausalLM", "AutoModelForCausalLM", ["num_hidden_layers"]),
    "gemma2": ("Gemma2Config", _lm(head_dim=8), "Gemma2ForCausalLM", "AutoModelForCausalLM", ["num_hidden_layers"]),
    "gemma3": (
        "Gemma3TextConfig",
        _lm(head_dim=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "Gemma3ForCausalLM",
        "AutoModelForCausalLM",
        ["num_hidden_layers"],
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=V, n_embd=H, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        "GPT2LMHeadModel",
        "AutoModelForCausalLM",
        ["n_layer"],
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "GPTNeoXForCausalLM",
        "AutoModelForCausalLM",
        ["num_hidden_layers"],
    ),
    "falcon": (
        "FalconConfig",
        dict(vocab_size=V, hidden_size=H, num_hidden_layers=3, num_attention_heads=4),
        "FalconForCausalLM",
        "AutoModelForCausalLM",
        ["num_hidden_layers"],
    ),
    "mixtral": (
        "MixtralConfig",
        _lm(num_local_experts=2, num_experts_per_tok=1),
        "MixtralForCausalLM",
        "AutoModelForCausalLM",
        ["num_hidden_layers"],
    ),
    # layer 1 has a dense MLP: the output's layers 1 and 2 (both layer 1) must be listed, else their keys mismatch
    "qwen2_moe": (
        "Qwen2MoeConfig",
        _lm(
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            mlp_only_layers=[1],
        ),
        "Qwen2MoeForCausalLM",
        "AutoModelForCausalLM",
        ["num_hidden_layers"],
    ),
    "bert": (
        "BertConfig",
        dict(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        "BertForMaskedLM",
        "AutoModelForMaskedLM",
        ["num_hidden_layers"],
    ),
    "vit": (
        "ViTConfig",
        _vision(3, num_labels=3),
        "ViTForImageClassification",
        "AutoModelForImageClassification",
        ["num_hidden_layers"],
    ),
}

# name: (config class, its arguments, model class, Auto class, module to slice, a word of its tensor prefix,
#        {config key: count after slicing it with OUT_LAYERS}, with the other stack's count unchanged)
MULTI = {
    "t5": (
        "T5Config",
        dict(vocab_size=V, d_model=H, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4),
        "T5ForConditionalGeneration",
        "AutoModelForSeq2SeqLM",
        "decoder",
        "decoder",
        {"num_decoder_layers": 4, "num_layers": 2},
    ),
    "whisper": (
        "WhisperConfig",
        dict(
            vocab_size=V,
            d_model=H,
            encoder_layers=3,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            decoder_start_token_id=3,
            suppress_tokens=[],
            begin_suppress_tokens=[],
        ),
        "WhisperForConditionalGeneration",
        "AutoModelForSpeechSeq2Seq",
        "encoder",
        "encoder",
        {"encoder_layers": 4, "decoder_layers": 2},
    ),
    "clip": (
        "CLIPConfig",
        dict(
            text_config=dict(
                vocab_size=V,
                hidden_size=H,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=32,
                bos_token_id=0,
                eos_token_id=1,
            ),
            vision_config=_vision(3),
            projection_dim=16,
        ),
        "CLIPModel",
        "AutoModel",
        "vision_model",
        "vision",
        {"vision_config.num_hidden_layers": 4, "text_config.num_hidden_layers": 2},
    ),
    "llava": (
        "LlavaConfig",
        dict(
            vision_config=dict(model_type="clip_vision_model", **_vision(2)),
            text_config=dict(model_type="llama", **_lm()),
            image_token_index=V - 1,
        ),
        "LlavaForConditionalGeneration",
        "AutoModelForImageTextToText",
        "text_decoder",
        "language",
        {"text_config.num_hidden_layers": 4, "vision_config.num_hidden_layers": 2},
    ),
}

FIRST_NUMBER = re.compile(r"^(.+?\.)(\d+)(\..*)$")  # prefix, layer, rest: `decoder.block.` `2` `.layer.0...`


def _class(name: str):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def build(folder: Path, spec, seed: int) -> Path:
    """Save a tiny random model; every tensor gets noise, so no two layers hold the same bytes."""
    cfg_cls, kwargs, model_cls = _class(spec[0]), spec[1], _class(spec[2])
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Builds each model the first time a test asks for it."""
    root, made = tmp_path_factory.mktemp("zoo"), {}

    def get(name: str, seed: int = 1) -> Path:
        if (name, seed) not in made:
            made[name, seed] = build(root / f"{name}-{seed}", {**SINGLE, **MULTI}[name], seed)
        return made[name, seed]

    return get


def merge(tmp_path: Path, text: str, capsys=None) -> Path:
    """Run a recipe through the CLI; fails unless it exits 0."""
    recipe, out = tmp_path / "r.yml", tmp_path / "out"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), str(out), "--quiet"])
    assert e.value.code == 0, capsys.readouterr().err if capsys else ""
    return out


def refused(tmp_path: Path, text: str, capsys) -> str:
    """Run a recipe that must be refused: exit 2, one line on stderr, and no output folder."""
    recipe, out = tmp_path / "r.yml", tmp_path / "out"
    recipe.write_text(text)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not out.exists()
    return err


def slice_recipe(model: Path, module: str = "") -> str:
    body = f"""slices:
  - sources: [{{model: {model}, layer_range: [0, 2]}}]
  - sources: [{{model: {model}, layer_range: [1, 3]}}]
"""
    if module:
        body = f"modules:\n  {module}:\n" + "".join(f"    {line}\n" for line in body.splitlines())
    return "merge_method: passthrough\n" + body


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def expected_tensors(src: dict, prefix: str) -> dict:
    """The output a slice run should write: the stack `prefix` with OUT_LAYERS, everything else as it was."""
    want = {}
    for name, t in src.items():
        m = FIRST_NUMBER.match(name)
        if m is None or m.group(1) != prefix:
            want[name] = t
        else:
            for o, i in enumerate(OUT_LAYERS):
                if int(m.group(2)) == i:
                    want[f"{prefix}{o}{m.group(3)}"] = t
    return want


def check_tensors(out: Path, src_folder: Path, prefix: str) -> None:
    got, want = read_folder(out), expected_tensors(read_folder(src_folder), prefix)
    assert sorted(got) == sorted(want)
    bad = [n for n in want if not same_bytes(got[n], want[n])]
    assert not bad, bad[:5]


def check_loads(out: Path, auto: str):
    model, info = _class(auto).from_pretrained(str(out), output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    return model


def stack_prefix(src_folder: Path, word: str) -> str:
    prefixes = {m.group(1) for n in read_folder(src_folder) if (m := FIRST_NUMBER.match(n))}
    return next(p for p in sorted(prefixes) if word in p)


def config_value(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_slices_repeat_a_layer_on_every_single_stack_architecture(name, zoo, tmp_path, capsys):
    src = zoo(name)
    out = merge(tmp_path, slice_recipe(src), capsys)
    cfg, src_cfg = (json.loads((f / "config.json").read_text()) for f in (out, src))
    assert set(cfg) == set(src_cfg)  # no key added (GPT-2 keeps n_layer alone) or lost
    for key in SINGLE[name][4]:
        assert cfg[key] == 4, key
    if "layer_types" in src_cfg:  # each output layer keeps its source layer's attention kind
        assert cfg["layer_types"] == [src_cfg["layer_types"][i] for i in OUT_LAYERS]
    if name == "qwen2_moe":
        assert cfg["mlp_only_layers"] == [1, 2]
    model = check_loads(out, SINGLE[name][3])
    assert model.config.num_hidden_layers == 4
    check_tensors(out, src, stack_prefix(src, "."))


# What comes before the layers (from the first slice's model), as mergekit's architecture files list it
FRONT = {
    "gpt2": ("transformer.wte.", "transformer.wpe."),
    "gpt_neox": ("gpt_neox.embed_in.",),
    "bert": ("bert.embeddings.",),
}


@pytest.mark.parametrize("name", sorted(FRONT))
def test_a_frankenmerge_takes_embeddings_from_the_first_slice_and_the_head_from_the_last(name, zoo, tmp_path, capsys):
    a, b = zoo(name, 1), zoo(name, 2)
    out = merge(
        tmp_path,
        f"""merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {b}, layer_range: [1, 3]}}]
""",
        capsys,
    )
    got, ta, tb = read_folder(out), read_folder(a), read_folder(b)
    outer = [n for n in got if not FIRST_NUMBER.match(n)]
    assert outer and any(n.startswith(FRONT[name]) for n in outer) and not all(n.startswith(FRONT[name]) for n in outer)
    for n in outer:
        assert same_bytes(got[n], (ta if n.startswith(FRONT[name]) else tb)[n]), n
    check_loads(out, SINGLE[name][3])


@pytest.mark.parametrize("name", sorted(MULTI))
def test_slices_on_a_two_stack_model_are_refused_naming_modules(name, zoo, tmp_path, capsys):
    err = refused(tmp_path, slice_recipe(zoo(name)), capsys)
    assert "modules:" in err and "2 layer stacks" in err and MULTI[name][4] in err


@pytest.mark.parametrize("name", sorted(MULTI))
def test_modules_slice_one_stack_and_keep_the_other(name, zoo, tmp_path, capsys):
    _, _, _, auto, module, word, counts = MULTI[name]
    src = zoo(name)
    out = merge(tmp_path, slice_recipe(src, module), capsys)
    cfg, src_cfg = (json.loads((f / "config.json").read_text()) for f in (out, src))
    for key, n in counts.items():
        assert config_value(cfg, key) == n, key
    model = check_loads(out, auto)
    for key, n in counts.items():  # transformers reads the same counts
        assert config_value(model.config.to_dict(), key) == n, key
    check_tensors(out, src, stack_prefix(src, word))  # the other stack and the rest: names and bytes unchanged


def test_models_merge_each_stack_with_its_own_gradient(zoo, tmp_path, capsys):
    """A gradient runs over each stack's layers (mergekit's per-module t): T5's last encoder layer (1 of 2) and
    last decoder layer (2 of 3) both sit at t = 1, where b has all the weight."""
    a, b = zoo("t5", 1), zoo("t5", 2)
    out = merge(
        tmp_path,
        f"""merge_method: linear
models:
  - model: {a}
    parameters: {{weight: [1.0, 0.0]}}
  - model: {b}
    parameters: {{weight: [0.0, 1.0]}}
""",
        capsys,
    )
    got, ta, tb = read_folder(out), read_folder(a), read_folder(b)
    last = ("encoder.block.1.layer.1.DenseReluDense.wo.weight", "decoder.block.2.layer.2.DenseReluDense.wo.weight")
    first = ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "decoder.block.0.layer.2.DenseReluDense.wo.weight")
    for names, want in ((last, tb), (first, ta)):
        for name in names:
            assert same_bytes(got[name], want[name]), name
    check_loads(out, "AutoModelForSeq2SeqLM")


def test_each_module_merges_by_its_own_parameters(zoo, tmp_path, capsys):
    """Module parameters rank between a model's own and the recipe's; the projector (outside both stacks) follows
    its own `multi_modal_projector:` entry."""
    a, b = zoo("llava", 1), zoo("llava", 2)
    out = merge(
        tmp_path,
        f"""merge_method: linear
parameters: {{weight: 0.5}}
modules:
  text_decoder:
    parameters: {{weight: 0.0}}
    models:
      - model: {a}
        parameters: {{weight: 1.0}}
      - model: {b}
  vision_tower:
    models:
      - {{model: {a}, parameters: {{weight: 0.0}}}}
      - {{model: {b}, parameters: {{weight: 1.0}}}}
  multi_modal_projector:
    models:
      - {{model: {a}, parameters: {{weight: 0.0}}}}
      - {{model: {b}, parameters: {{weight: 1.0}}}}
""",
        capsys,
    )
    got, ta, tb = read_folder(out), read_folder(a), read_folder(b)
    assert sorted(got) == sorted(ta)
    for name, t in got.items():
        want = ta if name.startswith("language_model.") else tb
        assert same_bytes(t, want[name]), name
    check_loads(out, "AutoModelForImageTextToText")


@pytest.mark.parametrize(
    "modules, message",
    [
        (
            "  encodr:\n    models: [{model: M}]",
            r"has no module 'encodr'; its modules are decoder, encoder, shared "
            r"\(did you mean 'encoder'\?\)",
        ),
        ("  shared:\n    slices: [{sources: [{model: M, layer_range: [0, 1]}]}]", r"'shared' holds no layers"),
        (
            "  encoder:\n    models: [{model: M}]\n  encoder.block:\n    models: [{model: M}]",
            r"'encoder.block' and 'encoder' name the same module",
        ),
        (
            "  decoder:\n    slices: [{sources: [{model: M, layer_range: [2, 4]}]}]",
            r"layer_range \[2, 4\] but \S+ has 3 layers in decoder",
        ),
        (
            "  decoder:\n    models: [{model: M}]\n    slices: [{sources: [{model: M, layer_range: [0, 1]}]}]",
            r"module 'decoder' needs exactly one of 'slices:' or 'models:' \(got both\)",
        ),
    ],
)
def test_modules_mistakes_are_refused_in_one_line(modules, message, zoo, tmp_path, capsys):
    text = "merge_method: passthrough\nmodules:\n" + modules.replace("M", str(zoo("t5"))) + "\n"
    assert re.search(message, refused(tmp_path, text, capsys))


def test_t5_config_without_a_decoder_count_gets_one():
    """T5 takes a missing num_decoder_layers from num_layers: slicing the encoder must write the decoder's."""
    names = [f"encoder.block.{i}.layer.0.SelfAttention.q.weight" for i in range(3)]
    names += [f"decoder.block.{i}.layer.0.SelfAttention.q.weight" for i in range(3)]
    an = anatomy(names + ["shared.weight"])
    out = {"encoder.block.": [("t", 0), ("t", 1), ("t", 1), ("t", 2)], "decoder.block.": [("t", i) for i in range(3)]}
    cfg = {"model_type": "t5", "num_layers": 3}
    assert update_counts(cfg, an, "t", out, {"t": cfg}) == {
        "model_type": "t5",
        "num_layers": 4,
        "num_decoder_layers": 3,
    }


def test_a_qwen2_vl_layout_names_its_modules_and_counts():
    """`model.layers` beside `visual.blocks`: the language model and the vision tower, counted by the top-level
    num_hidden_layers and vision_config.depth."""
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)] + ["model.embed_tokens.weight"]
    names += [f"visual.blocks.{i}.mlp.fc1.weight" for i in range(3)] + ["visual.merger.mlp.0.weight", "lm_head.weight"]
    an = anatomy(names)
    assert [s.module for s in an.stacks] == ["text_decoder", "vision_tower"]
    assert an.owner("visual.merger.mlp.0.weight") == "visual." + "blocks." and an.owner("lm_head.weight") is None
    cfg = {"num_hidden_layers": 2, "vision_config": {"depth": 3, "hidden_size": 8}}
    out = {"model.layers.": [("q", 0), ("q", 1)], "visual.blocks.": [("q", 0), ("q", 2)]}
    assert update_counts(cfg, an, "q", out, {"q": cfg}) == {
        "num_hidden_layers": 2,
        "vision_config": {"depth": 2, "hidden_size": 8},
    }


def test_stale_aliases_of_the_layer_count_follow_it():
    """Keys that counted the layers with num_hidden_layers count them after slicing too; a key that did not agree
    with it (not a count of this stack) and a per-layer list stay consistent."""
    an = anatomy([f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)])
    cfg = {"num_hidden_layers": 3, "n_layer": 3, "num_layers": 3, "n_layers": 5, "layer_types": ["a", "b", "c"]}
    out = {"transformer.h.": [("g", 2), ("g", 0)]}
    assert update_counts(cfg, an, "g", out, {"g": cfg}) == {
        "num_hidden_layers": 2,
        "n_layer": 2,
        "num_layers": 2,
        "n_layers": 5,
        "layer_types": ["c", "a"],
    }
