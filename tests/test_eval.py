"""Eval metrics against hand-computed values on a model whose every prediction is known.

The fixture is a one-layer Mistral with one-hot embeddings, silent attention and MLP, and an lm_head that maps
each token to a chosen successor: the model predicts succ(current token) with logit c = 1/sqrt(1/H + eps) and 0
for every other token. So greedy generation, teacher-forced accuracy and perplexity can be worked out by hand.
"""

import json
import math

import pytest
import torch

from mergesmith.evaluate import Task, exact_match, load, perplexity, token_accuracy

CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 ?:\n")
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def successor_model(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("succ")
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    V = len(vocab)
    H = 64
    succ = {i: i for i in range(V)}  # default: predict the same token
    order = "\ndef"  # after the assistant's newline: d, e, f, then end of turn
    for a, b in zip(order, order[1:]):
        succ[vocab[a]] = vocab[b]
    succ[vocab["f"]] = vocab["<|im_end|>"]
    succ[vocab["x"]] = vocab["y"]
    cfg = MistralConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    model = MistralForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[torch.arange(V), torch.arange(V)] = 1.0
        model.model.norm.weight.fill_(1.0)
        for i, j in succ.items():
            model.lm_head.weight[j, i] = 1.0
    model.save_pretrained(str(folder))
    c = 1 / math.sqrt(1 / H + cfg.rms_norm_eps)
    return folder, vocab, succ, c, V


def test_exact_match_and_token_accuracy_by_hand(successor_model):
    folder, vocab, succ, c, V = successor_model
    model, tok = load(folder)
    tasks = [Task("s", "hi", "def"), Task("s", "hi", "dex"), Task("t", "yo", "ab")]
    em = exact_match(model, tok, tasks)
    # greedy: after "assistant\n" the model says d, e, f, <|im_end|> -> "def"
    assert em == {"s": 0.5, "t": 0.0}
    acc = token_accuracy(model, tok, tasks)
    # "def"+end: d|\n ok, e|d ok, f|e ok, end|f ok -> 4/4; "dex"+end: d ok, e ok, x|e (predicts f) no,
    # end|x (predicts y) no -> 2/4; "ab"+end: a|\n (predicts d) no, b|a (predicts a) no, end|b no -> 0/3
    assert acc["s"] == pytest.approx(6 / 8)
    assert acc["t"] == 0.0


def test_perplexity_by_hand(successor_model):
    folder, vocab, succ, c, V = successor_model
    model, tok = load(folder)
    # "\ndefx": d|\n, e|d, f|e are predicted (logit c), x|f is not (the model expects end of turn)
    hit = c - math.log(math.exp(c) + V - 1)
    miss = -math.log(math.exp(c) + V - 1)
    want = math.exp(-(3 * hit + miss) / 4)
    assert perplexity(model, tok, "\ndefx") == pytest.approx(want, rel=1e-4)
    # windows: the same text in windows of 2 tokens loses no prediction (each window starts at the last one's end)
    assert perplexity(model, tok, "\ndefx", window=2) == pytest.approx(want, rel=1e-4)


def test_eval_cli_json_with_user_tasks_and_text(successor_model, tmp_path, capsys):
    from mergesmith.cli import main

    folder = successor_model[0]
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(
        json.dumps({"prompt": "hi", "answer": "def", "skill": "count"})
        + "\n"
        + json.dumps({"prompt": "hi", "answer": "abc"})
        + "\n"
    )
    text = tmp_path / "t.txt"
    text.write_text("\ndef")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(folder), "--tasks", str(tasks), "--text", str(text), "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    m = out["models"][0]
    assert m["accuracy"] == {"count": 1.0, "custom": 0.0}
    assert m["token_accuracy"]["count"] == 1.0
    assert m["perplexity"] == pytest.approx(
        math.exp(-(successor_model[3] - math.log(math.exp(successor_model[3]) + successor_model[4] - 1)))
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1}\n')
    with pytest.raises(SystemExit) as e:
        main(["eval", str(folder), "--tasks", str(bad)])
    assert e.value.code == 2
    assert "bad.jsonl:1: expected a JSON object" in capsys.readouterr().err
