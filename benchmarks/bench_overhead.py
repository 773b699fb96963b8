"""Per-call host overhead of fastpeft's layers (benchmarks/test_overhead.py, pytest-benchmark), run
by benchmarks/run.py, plus the torch.compile graph breaks of a LoRA Llama next to PEFT's.

pytest-benchmark runs in a subprocess without TRITON_INTERPRET, so on a CPU the layers take
their torch path (as a user's CPU run does), never the Triton interpreter; its JSON becomes
records with nn.Linear as the base and PEFT's LoRA layer (or the unfused adapter) as the peer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import common

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = {"M": 1, "K": 64, "N": 64}


def _pytest_benchmark(ctx) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "overhead.json")
        cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_overhead.py"), "--benchmark-only", "-q",
               "-p", "no:cacheprovider", f"--benchmark-json={out}", "--benchmark-max-time=0.2" if ctx.quick
               else "--benchmark-max-time=0.5"]
        proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=900)
        tail = proc.stdout.strip().splitlines()
        table = tail[tail.index(next(t for t in tail if "per-call overhead" in t)):] if any(
            "per-call overhead" in t for t in tail) else tail[-20:]
        print("\n".join("    " + t for t in table if not t.startswith("-- Docs")), flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pytest benchmarks/test_overhead.py exited {proc.returncode}:\n"
                               + proc.stdout[-3000:] + proc.stderr[-2000:])
        with open(out) as f:
            return json.load(f)


def _graph_breaks(ctx) -> None:
    """Graph breaks of one LoRA Llama training step under torch._dynamo.explain: fastpeft and PEFT."""
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        ctx.notes.append(f"graph breaks not counted: {exc}")
        return
    import fastpeft
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    ids = torch.randint(0, 64, (2, 8))
    counts = {}
    for name in ("fastpeft", "PEFT"):
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg).float().to(ctx.device)
        if name == "fastpeft":
            fastpeft.inject_lora(m, targets, r=4, lora_alpha=8, lora_dropout=0.1)
        else:
            m = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets))
        m.train()
        with fastpeft.use_backend("torch"):
            e = torch._dynamo.explain(lambda x: m(input_ids=x, labels=x, use_cache=False).loss)(ids.to(ctx.device))
        counts[name] = (e.graph_count, e.graph_break_count)
        torch._dynamo.reset()
    text = ("torch.compile of a LoRA Llama training step (torch._dynamo.explain): "
            + "; ".join(f"{k} {g} graph(s), {b} break(s)" for k, (g, b) in counts.items()))
    ctx.log(text)
    ctx.notes.append(text)
    ctx.bench_meta["graph_breaks"] = {k: {"graphs": g, "breaks": b} for k, (g, b) in counts.items()}


def run(ctx) -> list[dict]:
    from test_overhead import LAYERS
    ctx.log("per-call overhead at a 64x64 layer, one row, one thread (pytest-benchmark, eager)")
    data = _pytest_benchmark(ctx)
    records = []
    for b in data.get("benchmarks", []):
        name, mode = b["params"]["name"], b["params"]["mode"]
        group, role = LAYERS[name][0], LAYERS[name][1]
        stats = b["stats"]
        m = common.Measured(ms=stats["median"] * 1e3, ms_min=stats["min"] * 1e3, ms_max=stats["max"] * 1e3,
                            timing="pytest-benchmark")
        target = {"min_speedup_vs_peer": 1.0} if role == "ours" and group in ("lora", "lora_dropout") else None
        records.append(common.timing_record(
            "overhead", group, mode, SHAPE, "float32", name, {"base": "base", "peer": "peer", "unfused": "unfused",
                                                              "ours": "auto"}[role], m, target=target,
            rounds=stats["rounds"]))
    # the nn.Linear baseline goes into every group of its mode, so each ratio is against it
    bases = [r for r in records if r["role"] == "base"]
    for r in bases:
        for group in {x["op"] for x in records if x["mode"] == r["mode"] and x["op"] != "linear"}:
            records.append({**r, "op": group})
    try:
        _graph_breaks(ctx)
    except Exception as exc:  # the counts are a note; the timings stand without them
        ctx.notes.append(f"graph breaks not counted: {common.short_error(exc)}")
    return records
