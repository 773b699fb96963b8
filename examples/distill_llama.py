"""Distil a 4-layer Llama teacher into a 2-layer student with fastpeft.distill, on the CPU in about
half a minute (teacher, distillation and the labels-only baseline; 1 thread), and measure how
close the student gets to the teacher.

    .venv/bin/python -P examples/distill_llama.py
    .venv/bin/python -P examples/distill_llama.py --teacher-steps 150 --steps 150 --divergence jsd --no-baseline

Both models are Hugging Face LlamaForCausalLM built from a config (no download). The text is
generated here: sentences of a small grammar (subject-verb agreement, verb-dependent objects,
optional adverbs) mixed with counting runs ("count : four five six seven ."), word-level
tokens. The teacher is trained first on that text (a fixed random teacher would have nothing
worth distilling), then frozen; the student starts from random weights and learns from the
teacher's softened distributions (temperature 2) plus the next-token labels (alpha 0.5).

Reported: KL(teacher || student) per token at T = 1 on held-out text, before and after, and
(unless --no-baseline) that of the same student trained on the labels alone for the same steps,
for comparison. Printed: the data, then for each of the three trainings (teacher, distillation,
baseline) its progress (a tqdm bar on stderr when tqdm is installed, as it is with transformers,
else a line every few seconds) and a line with its result and time, and the total wall time.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the examples' shared helper
from _progress import Progress  # noqa: E402

SINGULAR = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child"]
PLURAL = ["the cats", "two dogs", "the birds", "my friends", "the teachers", "some children"]
VERBS = {  # verb (singular, plural) -> objects
    ("eats", "eat"): ["bread", "an apple", "the soup", "some rice"],
    ("reads", "read"): ["a book", "the letter", "the news", "a story"],
    ("sees", "see"): ["the river", "a house", "the moon", "a dog", "the cats"],
    ("likes", "like"): ["music", "the garden", "warm milk", "a story"],
}
ADVERBS = ["today", "slowly", "again", "at night"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def make_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.2:
            start = rng.randrange(0, 6)
            out.append("count : " + " ".join(NUMBERS[start:start + rng.randint(3, 4)]) + " .")
            continue
        plural = rng.random() < 0.5
        subject = rng.choice(PLURAL if plural else SINGULAR)
        verbs, objects = rng.choice(list(VERBS.items()))
        words = [subject, verbs[1] if plural else verbs[0], rng.choice(objects)]
        if rng.random() < 0.3:
            words.append(rng.choice(ADVERBS))
        out.append(" ".join(words) + " .")
    return out


def build_vocab(sentences: list[str]) -> dict[str, int]:
    words = sorted({w for s in sentences for w in s.split()})
    return {w: i for i, w in enumerate(words)}


def encode(sentences: list[str], vocab: dict[str, int], seq_len: int) -> torch.Tensor:
    """The word stream cut into [n, seq_len] sequences (no padding needed)."""
    ids = [vocab[w] for s in sentences for w in s.split()]
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len]).reshape(n, seq_len)


def llama(vocab_size: int, layers: int, hidden: int = 64, seed: int = 0):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).float()


def batches(data: torch.Tensor, batch_size: int, seed: int):
    """An endless stream of random batches (dicts of input_ids)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        yield {"input_ids": data[idx]}



def train_lm(model, data: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int,
             progress: bool = False, desc: str = "train") -> list[float]:
    """Plain next-token training (the teacher's, and the labels-only baseline's)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    stream = batches(data, batch_size, seed)
    losses = []
    bar = Progress(steps, desc, enabled=progress)
    try:
        for step in range(1, steps + 1):
            ids = next(stream)["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(step, losses[-1])
    finally:
        bar.close()
    model.eval()
    return losses


@torch.no_grad()
def mean_kl(teacher, student, data: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(teacher || student) per next-token prediction, averaged over ``data``'s positions."""
    teacher.eval()
    student.eval()
    lp = F.log_softmax(teacher(input_ids=data).logits.double() / temperature, -1)
    lq = F.log_softmax(student(input_ids=data).logits.double() / temperature, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@torch.no_grad()
def next_token_loss(model, data: torch.Tensor) -> float:
    model.eval()
    return float(model(input_ids=data, labels=data).loss)


def run(teacher_steps: int = 300, steps: int = 300, batch_size: int = 32, seq_len: int = 32, lr: float = 3e-3,
        temperature: float = 2.0, alpha: float = 0.5, divergence: str = "forward_kl", baseline: bool = False,
        sentences: int = 3000, progress: bool = True, log=print) -> dict:
    import fastpeft
    train_text = make_sentences(sentences, seed=1)
    test_text = make_sentences(max(sentences // 6, 100), seed=2)
    vocab = build_vocab(train_text + test_text)
    train, test = encode(train_text, vocab, seq_len), encode(test_text, vocab, seq_len)
    log(f"data: {len(vocab)} words, {train.shape[0]} training and {test.shape[0]} held-out sequences of "
        f"{seq_len} tokens")

    t0 = time.perf_counter()
    teacher = llama(len(vocab), layers=4, seed=0)
    train_lm(teacher, train, teacher_steps, lr, batch_size, seed=3, progress=progress, desc="teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    res = {"vocab": len(vocab), "teacher_steps": teacher_steps, "steps": steps,
           "teacher_params": sum(p.numel() for p in teacher.parameters()),
           "teacher_test_loss": next_token_loss(teacher, test)}
    res["teacher_s"] = time.perf_counter() - t0
    log(f"teacher: 4 layers, {res['teacher_params']} parameters, {teacher_steps} steps, held-out next-token "
        f"loss {res['teacher_test_loss']:.3f} ({res['teacher_s']:.1f} s)")

    student = llama(len(vocab), layers=2, seed=5)
    res["student_params"] = sum(p.numel() for p in student.parameters())
    res["kl_before"] = mean_kl(teacher, student, test)
    t0 = time.perf_counter()
    history = fastpeft.distill(student, teacher, batches(train, batch_size, seed=4), steps=steps,
                               temperature=temperature, alpha=alpha, divergence=divergence, lr=lr,
                               progress=progress)
    res["distill_s"] = time.perf_counter() - t0
    res["kl_after"] = mean_kl(teacher, student, test)
    res["student_test_loss"] = next_token_loss(student, test)
    res["loss_first"], res["loss_last"] = history[0], history[-1]
    log(f"student: 2 layers, {res['student_params']} parameters, {steps} distillation steps "
        f"({divergence}, T={temperature}, alpha={alpha}) in {res['distill_s']:.1f} s; loss "
        f"{history[0]:.3f} -> {history[-1]:.3f}")
    log(f"KL(teacher || student) per token on held-out text: {res['kl_before']:.3f} -> {res['kl_after']:.3f} "
        f"({res['kl_before'] / max(res['kl_after'], 1e-12):.1f}x lower); student next-token loss "
        f"{res['student_test_loss']:.3f} (teacher {res['teacher_test_loss']:.3f})")
    if baseline:
        t0 = time.perf_counter()
        plain = llama(len(vocab), layers=2, seed=5)
        train_lm(plain, train, steps, lr, batch_size, seed=4, progress=progress, desc="baseline")
        res["baseline_s"] = time.perf_counter() - t0
        res["kl_labels_only"] = mean_kl(teacher, plain, test)
        res["labels_only_test_loss"] = next_token_loss(plain, test)
        log(f"baseline, the same student trained on the labels alone for {steps} steps ({res['baseline_s']:.1f} s): "
            f"KL {res['kl_labels_only']:.3f}, next-token loss {res['labels_only_test_loss']:.3f}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the same student on the labels alone, for comparison (default: yes)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar / lines while training")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the models are tiny, extra threads mostly wait)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    run(args.teacher_steps, args.steps, temperature=args.temperature, alpha=args.alpha,
        divergence=args.divergence, baseline=args.baseline, progress=not args.no_progress)
    print(f"total {time.perf_counter() - t_start:.0f} s (wall, {args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
