"""Models whose vocabularies differ: the output vocabulary, each model's rows permuted into it, the fill rules
(checked row by row against rules written here), tokenizer round trips, and a chat turn that generates."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import make_mistral, read_folder, run_recipe
from mergesmith.errors import MergeError

N = 300  # tokens of the test tokenizer (helpers.make_tokenizer)
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _add_tokens(folder, tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": tokens})
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """base (300 tokens + <extra>); chat (+ <tool_call>, </tool_call>); chat2 (+ <tool_call>, <extra>); padded
    (300 tokens, 384 embedding rows). Float32, so rows can be compared exactly."""
    root = tmp_path_factory.mktemp("vocab")
    make_mistral(root / "base", seed=1, vocab=N + 1, dtype=torch.float32)
    _add_tokens(root / "base", ["<extra>"])
    make_mistral(root / "chat", seed=2, vocab=N + 2, dtype=torch.float32)
    _add_tokens(root / "chat", ["<tool_call>", "</tool_call>"])
    make_mistral(root / "chat2", seed=3, vocab=N + 2, dtype=torch.float32)
    _add_tokens(root / "chat2", ["<tool_call>", "<extra>"])
    make_mistral(root / "padded", seed=4, vocab=384, dtype=torch.float32)
    return root


def vocabs(root, names):
    from transformers import AutoTokenizer

    return {n: AutoTokenizer.from_pretrained(str(root / n)).get_vocab() for n in names}


def expected_rows(root, names, base, out_vocab, size, tensor, overrides=None):
    """Each model's row for each output token by the documented rules, written independently of mergesmith."""
    overrides = overrides or {}
    voc = vocabs(root, names)
    sds = {n: read_folder(root / n)[tensor].double().numpy() for n in names}
    rows = {n: sds[n].shape[0] for n in names}
    has = {n: {t: i for t, i in voc[n].items() if i < rows[n]} for n in names}
    out = {n: np.zeros((size, sds[n].shape[1])) for n in names}
    for tok, oid in out_vocab.items():
        ov = overrides.get(tok, {})
        holders = [n for n in names if tok in has[n]]
        if "zero" in ov:
            default = np.zeros(sds[names[0]].shape[1])
        elif "model" in ov:
            default = sds[ov["model"]][has[ov["model"]][tok]]
        elif len(holders) == 1:
            default = sds[holders[0]][has[holders[0]][tok]]
        elif base in holders:
            default = sds[base][has[base][tok]]
        elif holders:
            default = np.mean([sds[n][has[n][tok]] for n in holders], axis=0)
        else:
            default = np.zeros(sds[names[0]].shape[1])
        for n in names:
            out[n][oid] = sds[n][has[n][tok]] if (tok in has[n] and not ov.get("force")) else default
    n_tok = max(out_vocab.values()) + 1
    for n in names:
        out[n][n_tok:] = out[n][:n_tok].mean(axis=0)
    return out


def _recipe(root, tok_block, method="task_arithmetic"):
    return f"""
merge_method: {method}
base_model: {root / "base"}
models:
  - model: {root / "chat"}
    parameters: {{weight: 0.5}}
  - model: {root / "chat2"}
    parameters: {{weight: 0.3}}
  - model: {root / "padded"}
    parameters: {{weight: 0.25}}
dtype: float32
{tok_block}
"""


@pytest.mark.parametrize("tensor", [EMB, HEAD])
def test_union_vocabulary_rows_follow_the_fill_rules(vocab_family, tmp_path, tensor):
    root = vocab_family
    r = tmp_path / "r.yml"
    r.write_text(_recipe(root, "tokenizer_source: union"))
    run_recipe(str(r), str(tmp_path / "out"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    out_vocab = tok.get_vocab()
    assert {"<tool_call>", "</tool_call>", "<extra>"} <= set(out_vocab) and len(out_vocab) == N + 3
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == N + 3
    got = read_folder(tmp_path / "out")[tensor].double().numpy()
    assert got.shape[0] == N + 3
    names = ["base", "chat", "chat2", "padded"]
    rows = expected_rows(root, names, "base", out_vocab, N + 3, tensor)
    want = (
        rows["base"]
        + 0.5 * (rows["chat"] - rows["base"])
        + 0.3 * (rows["chat2"] - rows["base"])
        + 0.25 * (rows["padded"] - rows["base"])
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # the three rules are all exercised: base row, single holder, mean of holders
    base_sd = read_folder(root / "base")[tensor].double().numpy()
    assert np.allclose(rows["chat"][out_vocab["<extra>"]], base_sd[N])  # chat2 has it too: the base's wins
    ids = {t: out_vocab[t] for t in ("<tool_call>", "</tool_call>", "<extra>")}
    chat = read_folder(root / "chat")[tensor].double().numpy()
    chat2 = read_folder(root / "chat2")[tensor].double().numpy()
    v_chat, v_chat2 = vocabs(root, ["chat", "chat2"]).values()
    mean_tc = (chat[v_chat["<tool_call>"]] + chat2[v_chat2["<tool_call>"]]) / 2
    assert np.allclose(rows["base"][ids["<tool_call>"]], mean_tc)
    assert np.allclose(rows["padded"][ids["</tool_call>"]], chat[v_chat["</tool_call>"]])


def test_merged_tokenizer_encodes_the_union_and_a_chat_turn_generates(vocab_family, tmp_path):
    root = vocab_family
    r = tmp_path / "r.yml"
    r.write_text(_recipe(root, "tokenizer_source: union\nchat_template: chatml"))
    out = tmp_path / "out"
    run_recipe(str(r), str(out))
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch
tok = AutoTokenizer.from_pretrained(r'{out}')
ids = tok.encode('hello <tool_call>world</tool_call> <extra>', add_special_tokens=False)
assert tok.convert_tokens_to_ids('<tool_call>') in ids and tok.convert_tokens_to_ids('<extra>') in ids
assert tok.decode(ids) == 'hello <tool_call>world</tool_call> <extra>', tok.decode(ids)
m = AutoModelForCausalLM.from_pretrained(r'{out}')
assert m.get_input_embeddings().weight.shape[0] == len(tok)
chat = tok.apply_chat_template([{{'role': 'user', 'content': 'hello world'}}], add_generation_prompt=True,
                               return_tensors='pt', return_dict=True)
assert '<|im_start|>assistant' in tok.decode(chat['input_ids'][0])
o = m.generate(**chat, max_new_tokens=5, do_sample=False)
assert o.shape[1] == chat['input_ids'].shape[1] + 5
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_tokens_block_overrides_force_and_padding(vocab_family, tmp_path):
    root = vocab_family
    block = f"""tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    <tool_call>:
      source: {root / "chat2"}
      force: true
    <extra>:
      source: {{kind: zero}}
      force: true
    <|im_end|>:
      source: {{kind: model_token, model: {root / "chat"}, token: "<|im_start|>"}}
      force: true
    <new>:
      source: {{kind: model_token, model: {root / "chat2"}, token_id: 5}}
"""
    r = tmp_path / "r.yml"
    r.write_text(_recipe(root, block, method="linear").replace(f"base_model: {root / 'base'}\n", ""))
    run_recipe(str(r), str(tmp_path / "out"))
    from transformers import AutoTokenizer

    out_vocab = AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    assert len(out_vocab) == N + 4
    got = read_folder(tmp_path / "out")[EMB].double().numpy()
    assert got.shape[0] == 320  # N + 4 = 304 padded to a multiple of 64
    names = ["chat", "chat2", "padded"]
    v = vocabs(root, ["chat"])
    sd = {n: read_folder(root / n)[EMB].double().numpy() for n in ("chat", "chat2")}
    overrides = {"<tool_call>": {"model": "chat2", "force": True}, "<extra>": {"zero": 1, "force": True}}
    rows = expected_rows(root, names, None, out_vocab, 320, EMB, overrides)
    for n in names:  # model_token sources, by hand
        rows[n][out_vocab["<|im_end|>"]] = sd["chat"][v["chat"]["<|im_start|>"]]
        rows[n][out_vocab["<new>"]] = sd["chat2"][5]
        rows[n][N + 4 :] = rows[n][: N + 4].mean(axis=0)
    want = (0.5 * rows["chat"] + 0.3 * rows["chat2"] + 0.25 * rows["padded"]) / 1.05
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert np.all(got[out_vocab["<extra>"]] == 0)


def test_bad_token_source_is_one_line(vocab_family, tmp_path):
    root = vocab_family
    r = tmp_path / "r.yml"
    r.write_text(
        _recipe(
            root,
            "tokenizer:\n  tokens:\n    <x>:\n      source: {kind: model_token, model: "
            f"{root / 'chat'}, token: nope}}\n",
        )
    )
    with pytest.raises(MergeError, match=r"r.yml:\d+: token 'nope' is not in model"):
        run_recipe(str(r), str(tmp_path / "out"))


def test_a_tied_model_lends_its_embeddings_as_lm_head(vocab_family, tmp_path):
    """A model with tie_word_embeddings and no lm_head.weight, merged with untied ones: its embedding rows stand in
    for its lm_head rows (after permutation into the union vocabulary)."""
    import shutil

    from safetensors.torch import save_file

    root = vocab_family
    tied = tmp_path / "tied"
    shutil.copytree(root / "chat2", tied)
    sd = read_folder(tied)
    del sd[HEAD]
    (tied / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tied / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    r = tmp_path / "r.yml"
    r.write_text(
        f"merge_method: linear\nmodels:\n  - model: {root / 'chat'}\n    parameters: {{weight: 1}}\n"
        f"  - model: {tied}\n    parameters: {{weight: 1}}\ntokenizer_source: union\ndtype: float32\n"
    )
    run_recipe(str(r), str(tmp_path / "out"))
    from transformers import AutoTokenizer

    out_vocab = AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    got = read_folder(tmp_path / "out")[HEAD].double().numpy()
    # the tied model's lm_head rows are its embedding rows, filled by the same rules
    v_chat, v_tied = vocabs(root, ["chat"])["chat"], vocabs(tmp_path, ["tied"])["tied"]
    emb_tied = sd[EMB].double().numpy()
    head_chat = read_folder(root / "chat")[HEAD].double().numpy()
    for tok, i in out_vocab.items():
        a = head_chat[v_chat[tok]] if tok in v_chat else emb_tied[v_tied[tok]]  # single holder: the other's row
        b = emb_tied[v_tied[tok]] if tok in v_tied else head_chat[v_chat[tok]]
        np.testing.assert_allclose(got[i], (a + b) / 2, atol=2e-6, err_msg=tok)
    assert got.shape[0] == len(out_vocab)
