"""Train LoRA on a tiny Llama under DistributedDataParallel, save the adapter from rank 0, load it
into a fresh model and check the logits.

    torchrun --standalone --nproc_per_node=2 examples/train_lora_ddp.py   # 2 processes, a free port
    torchrun --standalone --nproc_per_node=2 examples/train_lora_ddp.py --steps 100 --out my-adapter
    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 examples/train_lora_ddp.py

Backend: nccl with one GPU per process when CUDA is available (as many GPUs as processes on a
node), else gloo on the CPU (``--cpu`` forces it). The model is a Hugging Face LlamaForCausalLM
built from a config (no download), the same on every process (same seed; DDP also broadcasts
rank 0's parameters when it wraps the model), with fastpeft LoRA on q/k/v/o: only lora_A /
lora_B train, so DDP's gradient buckets hold only them. The data is generated here: a fixed
random permutation of the vocabulary gives each token its successor, and each sequence follows
it from a random first token (the loss falls from ln 64 = 4.16 as the model learns it).

Each step, every process builds the same global batch and takes its own rows; DDP averages the
gradients, so they equal one process's on the whole global batch (checked on rank 0 for the first
step, unless ``--no-check``). Saving: every process calls ``fastpeft.save_adapter(ddp_model, dir)``
on the wrapped model; it writes the names of the unwrapped model (PEFT's), from rank 0 alone
(the LoRA weights are the same on every process). Calling it on every process is what FSDP
needs (there it gathers the shards); under DDP, calling it on rank 0 alone works too. The
directory loads with ``fastpeft.load_adapter`` (and ``peft.PeftModel.from_pretrained``).

Printed (rank 0): the set-up, the loss before and after, how many values DDP all-reduced per step
(the trainable ones), the checks, where the adapter went and the time taken (seconds on 2 CPU
processes: no progress bar needed).
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
VOCAB = 64
SUCCESSOR = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(7))  # the token after each token


def base_model():
    """A 2-layer Llama (hidden 64, float32) with random weights, always the same ones (seed 0)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


def build_model(lora_seed: int = 0):
    """``base_model()`` with LoRA r=8 on q/k/v/o (lora_A drawn from ``lora_seed``, lora_B zero)."""
    import fastpeft
    model = base_model()
    torch.manual_seed(lora_seed)
    return fastpeft.inject_lora(model, TARGETS, r=8, lora_alpha=16, lora_dropout=0.0)


def global_batch(step: int, batch_size: int, seq_len: int = 32) -> torch.Tensor:
    """[batch_size, seq_len] token ids, the same on every process: each sequence follows SUCCESSOR
    from a random first token."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = [torch.randint(0, VOCAB, (batch_size,), generator=g)]
    for _ in range(seq_len - 1):
        ids.append(SUCCESSOR[ids[-1]])
    return torch.stack(ids, 1)


def trained_values(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model, steps: int, batch_size: int, lr: float, rank: int, world: int, device):
    """AdamW on the causal-LM loss; each process takes its rows of every global batch. Returns each
    step's loss (this process's rows) and the first step's gradients (DDP's: averaged over the
    processes), flattened."""
    opt = torch.optim.AdamW(trained_values(model), lr=lr, weight_decay=0.0)
    model.train()
    per = batch_size // world
    losses, first_grads = [], None
    for step in range(steps):
        ids = global_batch(step, batch_size)[rank * per:(rank + 1) * per].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if first_grads is None:
            first_grads = torch.cat([p.grad.double().flatten() for p in trained_values(model)])
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses, first_grads


def lora_vector(model) -> torch.Tensor:
    """Every LoRA weight of ``model``, flattened into one float64 vector (state-dict order)."""
    import fastpeft
    return torch.cat([v.detach().double().flatten() for v in fastpeft.lora_state_dict(model).values()])


def counting_allreduce(state: dict, bucket):
    """DDP communication hook: count the values in each gradient bucket, then all-reduce it as DDP
    does by default (sum, divided by the world size)."""
    state["values"] += bucket.buffer().numel()
    return default_hooks.allreduce_hook(None, bucket)


def mean_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"check failed: {what}")


def run(steps: int, batch_size: int, lr: float, out: str | None, cpu: bool, reference: bool, log=print) -> dict:
    import fastpeft
    use_cuda = torch.cuda.is_available() and not cpu
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda and torch.cuda.device_count() <= local_rank:
        raise SystemExit(f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} "
                         f"visible): start at most that many processes per node, or pass --cpu")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if batch_size % world:
            raise SystemExit(f"--batch-size {batch_size} must be a multiple of the number of processes ({world})")
        say = log if rank == 0 else (lambda *a, **k: None)
        res = {"world": world, "backend": backend, "device": str(device)}
        say(f"DDP: {world} processes, backend {backend}, device {device.type}")

        model = build_model().to(device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        res["trainable"] = trainable
        say(f"model: tiny Llama (2 layers, hidden 64), LoRA r=8 on {'/'.join(t[0] for t in TARGETS)}: "
            f"{trainable:,} trainable of {total:,} values")
        single = copy.deepcopy(model) if reference and rank == 0 else None

        ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
        counter = {"values": 0}
        ddp.register_comm_hook(counter, counting_allreduce)
        t0 = time.perf_counter()
        losses, grads = train(ddp, steps, batch_size, lr, rank, world, device)
        res["train_s"] = time.perf_counter() - t0
        res["loss_first"] = mean_over_ranks(losses[0], device)
        res["loss_last"] = mean_over_ranks(losses[-1], device)
        res["reduced_per_step"] = counter["values"] / steps
        say(f"trained {steps} steps, global batch {batch_size} ({batch_size // world} per process): loss "
            f"{res['loss_first']:.3f} -> {res['loss_last']:.3f} ({res['train_s']:.1f} s)")
        say(f"DDP all-reduced {res['reduced_per_step']:,.0f} values per step (trainable: {trainable:,})")
        check(res["reduced_per_step"] == trainable, "DDP reduced other values than the trainable ones")

        mine = lora_vector(ddp.module)
        first = mine.clone()
        dist.broadcast(first, 0)
        spread = torch.tensor([(mine - first).abs().max().item()], device=device)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        res["rank_spread"] = spread.item()
        say(f"every process holds the same LoRA weights (max |diff| to rank 0: {res['rank_spread']:.1e})")
        check(res["rank_spread"] == 0, "the processes' LoRA weights differ")

        if single is not None:  # rank 0: the first step in one process, on the whole global batch
            _, want = train(single, 1, batch_size, lr, 0, 1, device)
            res["vs_one_process"] = ((grads - want).abs().max() / want.abs().max()).item()
            say(f"first step's gradients against one process on the whole global batch: max |diff| "
                f"{res['vs_one_process']:.1e} of the largest")
            check(res["vs_one_process"] < 1e-5, "DDP's gradients differ from a one-process run")

        # Every process calls save_adapter on the wrapped model (the pattern FSDP needs: there it
        # gathers the shards); under DDP nothing is gathered and rank 0 alone writes the files.
        where = [out if out is not None else tempfile.mkdtemp(prefix="lora-ddp-") if rank == 0 else None]
        dist.broadcast_object_list(where, src=0)
        directory = where[0]
        fastpeft.save_adapter(ddp, directory)
        dist.barrier()  # written before anyone reads them
        if rank == 0:
            files = sorted(os.listdir(directory))
            size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
            say(f"adapter saved to {directory} (written by rank 0): {', '.join(files)} ({size / 1024:.1f} kB)")
            fresh = fastpeft.load_adapter(build_model(lora_seed=1).to(device), directory)  # other lora_A
            fresh.eval()
            ids = global_batch(10_000, 4).to(device)  # held out
            with torch.no_grad():
                want, got = ddp.module(input_ids=ids).logits, fresh(input_ids=ids).logits
            res["reload_diff"] = (want - got).abs().max().item()
            say(f"reloaded into a fresh model: logits max |diff| {res['reload_diff']:.1e}")
            check(res["reload_diff"] <= 1e-6, "the reloaded adapter gives other logits")
            if out is None:
                shutil.rmtree(directory)
                say("(a temporary directory, now removed: pass --out DIR to keep the adapter)")
        res["out"] = out
        dist.barrier()
        return res
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (split across the processes)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default=None, help="where to save the adapter (default: a temporary directory)")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU even when CUDA is available")
    ap.add_argument("--no-check", action="store_true", help="skip the one-process comparison on rank 0")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per process (default 1: the model is tiny)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("start it with torchrun (or python -m torch.distributed.run), e.g. "
                 "torchrun --nproc_per_node=2 examples/train_lora_ddp.py")
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    run(args.steps, args.batch_size, args.lr, args.out, args.cpu, not args.no_check)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"total {time.perf_counter() - t_start:.1f} s (rank 0, wall, after start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
