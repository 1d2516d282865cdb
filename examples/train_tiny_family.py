"""Train the bundled tiny model family (seeded, CPU, about 15 minutes on 2 cores).

    python examples/train_tiny_family.py --out src/mergesmith/data/tiny

Makes, in the Mistral architecture (MistralForCausalLM, untied embeddings, like Mistral-Nemo):
- `tokenizer`: byte-level BPE (768 tokens, single digits) with <|im_start|>/<|im_end|> and the ChatML template;
- `base`: pretrained on Python's documentation (pydoc_data), a little ChatML chat about it, and plain-text drills of
  three operations ("7 + 8 makes 15.", "c a t backwards reads t a c.", "d b a in order reads a b d.");
- `addition`, `reverse`, `sort`: full-weight chat fine-tunes of the base (small learning rate, few steps, loss on
  the answer only), each teaching the base to do one operation when asked in chat.
What was tried and why it looks like this: docs/tiny-family.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from mergesmith.skills import SKILLS, training_examples
from tiny_family_data import chat_documents, drill, pretraining_documents

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chat(user: str, assistant: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n"


def build_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML
    return fast


def pretraining_stream(tok, seed: int, drills_per_skill: int):
    rng = random.Random(seed)
    pieces = [d + "\n\n" for d in pretraining_documents()]
    pieces += [chat(q, a) for q, a in chat_documents()] * 3
    for skill in SKILLS:
        lines = [drill(skill, rng) for _ in range(drills_per_skill)]
        pieces += ["\n".join(lines[i : i + 8]) + "\n\n" for i in range(0, len(lines), 8)]
    rng.shuffle(pieces)
    ids = []
    for p in pieces:
        ids += tok(p)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cosine(step, total, warmup, peak):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(model, stream, steps, batch, seq, lr, seed, log):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine(step, steps, max(1, steps // 20), lr)
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        x = torch.stack([stream[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"pretrain step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")


def sft_batch(tok, examples):
    """Right-padded ChatML examples; labels only on the answer and its <|im_end|>."""
    rows, labels = [], []
    for p, a in examples:
        prompt = tok(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        answer = tok(f"{a}<|im_end|>")["input_ids"]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    n = max(map(len, rows))
    pad = tok.pad_token_id
    x = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    y = torch.tensor([r + [-100] * (n - len(r)) for r in labels])
    att = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return x, y, att


def finetune(model, tok, skill, steps, batch, lr, seed, log):
    data = training_examples(skill, steps * batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine(step, steps, max(1, steps // 10), lr)
        x, y, att = sft_batch(tok, data[step * batch : (step + 1) * batch])
        loss = model(input_ids=x, attention_mask=att, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"{skill} step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")


def save(model, tok, folder: Path):
    if folder.exists():
        shutil.rmtree(folder)
    model.to(torch.bfloat16).save_pretrained(str(folder))
    model.to(torch.float32)
    tok.save_pretrained(str(folder))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="src/mergesmith/data/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--inter", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=768)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--drills", type=int, default=12000, help="plain-text drills per skill in pretraining")
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-pretrain", action="store_true", help="reuse OUT/base, only redo the fine-tunes")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "training-log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {vars(a)}")
    t_all = time.time()
    if a.skip_pretrain:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out / "base")
    else:
        rng = random.Random(a.seed)
        corpus = pretraining_documents() + [chat(q, r) for q, r in chat_documents()]
        corpus += [drill(s, rng) for s in SKILLS for _ in range(500)]
        tok = build_tokenizer(corpus, a.vocab)
        stream = pretraining_stream(tok, a.seed, a.drills)
        log(f"tokenizer: {len(tok)} tokens; pretraining stream: {len(stream)} tokens")
        cfg = MistralConfig(
            vocab_size=len(tok),
            hidden_size=a.hidden,
            intermediate_size=a.inter,
            num_hidden_layers=a.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=a.hidden // 4,
            max_position_embeddings=256,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = MistralForCausalLM(cfg)
        log(f"parameters: {sum(p.numel() for p in model.parameters())}")
        pretrain(model, stream, a.pretrain_steps, a.batch, a.seq, a.pretrain_lr, a.seed, log)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        save(model, tok, out / "base")
    for i, skill in enumerate(SKILLS):
        torch.manual_seed(a.seed + 1 + i)
        # start from the saved (bf16-rounded) base, as anyone fine-tuning the published base would
        model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        finetune(model, tok, skill, a.ft_steps, a.batch, a.ft_lr, a.seed + 1 + i, log)
        save(model, tok, out / skill)
    log(f"done in {time.time() - t_all:.0f} s")
    (out / "README.md").write_text(
        "# The mergesmith tiny model family\n\nMade by `examples/train_tiny_family.py` with "
        f"`{json.dumps(vars(a))}`.\nSee docs/tiny-family.md.\n"
    )


if __name__ == "__main__":
    main()
