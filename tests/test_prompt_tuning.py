"""Prompt tuning: PromptTuning, add_prompt_tuning on tiny GPT-2 / Llama / BERT (forward, loss,
generate, training), strip_prompt, and PEFT's prompt-tuning files both ways."""
import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpeft
from fastpeft import PromptTuning, add_prompt_tuning, load_adapter, save_adapter, strip_prompt

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
peft = pytest.importorskip("peft")
from _hf import tiny_llama, torch_backend  # noqa: E402,F401  (torch_backend: autouse fixture)
from _utils import rel_err  # noqa: E402

V, T = 128, 4


def no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_gpt2(seed=0):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return no_eos(transformers.GPT2LMHeadModel(cfg).float().eval())


def tiny_llama_wide(seed=0):
    """_hf.tiny_llama with weights ~N(0, 0.2): greedy decoding then does not repeat one token."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.mul_(10.0)
    return model


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=37, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **kw)


def tiny_bert(cls=None, seed=0, **kw):
    torch.manual_seed(seed)
    return (cls or transformers.BertModel)(bert_config(**kw)).float().eval()


MAKERS = {
    "gpt2": tiny_gpt2,
    "llama": lambda: no_eos(tiny_llama_wide()),
    "bert": tiny_bert,
    "bert_seqcls": lambda: tiny_bert(transformers.BertForSequenceClassification, num_labels=3),
    "bert_tokcls": lambda: tiny_bert(transformers.BertForTokenClassification, num_labels=5),
}
_BASES = {}


def fresh(kind):
    """A new copy of the tiny model ``kind`` (built once per session)."""
    if kind not in _BASES:
        _BASES[kind] = MAKERS[kind]()
    return copy.deepcopy(_BASES[kind])


X = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(X)
MASK[1, :2] = 0  # left padding in the second row


def reference(base, prompt, input_ids, attention_mask=None, **kw):
    """What the prompt-tuned model must compute: the untouched base model on [P; embeddings]."""
    embeds = base.get_input_embeddings()(input_ids)
    embeds = torch.cat((prompt.unsqueeze(0).expand(len(input_ids), -1, -1), embeds), dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat((torch.ones(len(input_ids), len(prompt), dtype=attention_mask.dtype),
                                    attention_mask), dim=1)
    return base(inputs_embeds=embeds, attention_mask=attention_mask, **kw)


def prompt_of(model):
    return model.prompt_tuning.weight.detach()


def randomize_prompt(model, seed=5):
    with torch.no_grad():
        model.prompt_tuning.weight.copy_(torch.randn(model.prompt_tuning.weight.shape,
                                                     generator=torch.Generator().manual_seed(seed)))
    return model



# ---------------------------------------------------------------------------------------------
# the module


def test_module():
    g = torch.Generator().manual_seed(0)
    p = PromptTuning(3, 8, generator=g)
    assert p.weight.shape == (3, 8) and p.weight.dtype == torch.float32 and p.weight.requires_grad
    assert torch.equal(p.weight.detach(), torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    init = torch.randn(3, 8, dtype=torch.float64)
    q = PromptTuning(3, 8, init)
    assert torch.equal(q.weight.detach(), init.float()) and q.weight.data_ptr() != init.data_ptr()
    x = torch.randn(2, 5, 8, dtype=torch.float16)
    y = q(x)
    assert y.shape == (2, 8, 8) and y.dtype == torch.float16
    assert torch.equal(y[:, :3], q.weight.detach().half().expand(2, -1, -1)) and torch.equal(y[:, 3:], x)
    y.float().sum().backward()
    assert torch.equal(q.weight.grad, torch.full((3, 8), 2.0))
    with pytest.raises(ValueError, match="num_virtual_tokens must be > 0"):
        PromptTuning(0, 8)
    with pytest.raises(TypeError, match="num_virtual_tokens must be an int"):
        PromptTuning(2.0, 8)
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        PromptTuning(3, 8, torch.zeros(4, 8))
    with pytest.raises(ValueError, match="init must be 'random'"):
        PromptTuning(3, 8, "vocab")
    with pytest.raises(TypeError, match="floating point"):
        PromptTuning(3, 8, torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding_dim 8"):
        q(torch.randn(2, 5, 7))


# ---------------------------------------------------------------------------------------------
# causal LMs: forward, loss, generate


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_forward_and_loss(kind):
    base = fresh(kind)
    model = randomize_prompt(add_prompt_tuning(fresh(kind), T))
    labels = X.masked_fill(MASK == 0, -100)
    out = model(input_ids=X, attention_mask=MASK, labels=labels)
    assert out.logits.shape == (2, T + X.shape[1], V)
    ext = torch.cat((torch.full((2, T), -100), labels), dim=1)
    ref = reference(base, prompt_of(model), X, MASK, labels=ext)
    assert rel_err(out.logits, ref.logits) < 1e-6 and abs(out.loss.item() - ref.loss.item()) < 1e-6
    # HF's shifted loss over [P; tokens] with the prompt's labels -100: the prompt positions never count
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ext[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - manual.item()) < 1e-6
    # the prompt matters, positional and inputs_embeds calls give the same
    assert rel_err(out.logits[:, T:], base(input_ids=X, attention_mask=MASK).logits) > 1e-3
    assert torch.equal(model(X, attention_mask=MASK).logits, out.logits)
    embeds = model.get_input_embeddings()(X)
    assert torch.equal(model(inputs_embeds=embeds, attention_mask=MASK).logits, out.logits)


def greedy_reference(base, prompt, input_ids, steps):
    """Greedy decoding by running the whole [P; tokens] through the base model at every step."""
    seq = input_ids
    for _ in range(steps):
        logits = reference(base, prompt, seq).logits
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_matches_full_forward(kind):
    base = fresh(kind)
    model = randomize_prompt(add_prompt_tuning(fresh(kind), T))
    steps = 6
    out = model.generate(input_ids=X, attention_mask=torch.ones_like(X), max_new_tokens=steps, do_sample=False)
    want = greedy_reference(base, prompt_of(model), X, steps)
    assert torch.equal(out, want)
    assert len(set(want[:, X.shape[1]:].flatten().tolist())) > 2  # not a degenerate repetition
    no_cache = model.generate(input_ids=X, attention_mask=torch.ones_like(X), max_new_tokens=steps,
                              do_sample=False, use_cache=False)
    assert torch.equal(no_cache, want)
    # left padding: each row generates what it generates alone
    padded = model.generate(input_ids=X, attention_mask=MASK, max_new_tokens=steps, do_sample=False)
    alone = model.generate(input_ids=X[1:, 2:], attention_mask=MASK[1:, 2:], max_new_tokens=steps,
                           do_sample=False)
    assert torch.equal(padded[0], want[0]) and torch.equal(padded[1, 2:], alone[0])
    # a generation step with a cache holding the prompt: mask over the real tokens only
    first = model(input_ids=X, use_cache=True)
    cache = first.get("cache", first.get("past_key_values"))
    nxt = first.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.ones(2, X.shape[1] + 1, dtype=torch.long)
    key = "cache" if "cache" in first else "past_key_values"
    step = model(input_ids=nxt, attention_mask=mask, **{key: cache})
    full = reference(base, prompt_of(model), want[:, :X.shape[1] + 1]).logits
    assert rel_err(step.logits[:, -1], full[:, -1]) < 1e-5


# ---------------------------------------------------------------------------------------------
# encoders


def test_bert_encoder_outputs_and_strip():
    base = fresh("bert")
    model = randomize_prompt(add_prompt_tuning(fresh("bert"), T))
    assert model.prompt_tuning.task_type == "FEATURE_EXTRACTION"
    types = torch.zeros_like(X)
    types[:, 4:] = 1
    out = model(input_ids=X, attention_mask=MASK, token_type_ids=types, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, T + X.shape[1], 32)
    ref = reference(base, prompt_of(model), X, MASK, output_hidden_states=True,
                    token_type_ids=torch.cat((torch.zeros(2, T, dtype=torch.long), types), dim=1))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-6
    assert rel_err(out.pooler_output, ref.pooler_output) < 1e-6  # BERT pools position 0: the first virtual token
    stripped = strip_prompt(out, T)
    assert type(stripped) is type(out)
    assert torch.equal(stripped.last_hidden_state, out.last_hidden_state[:, T:])
    assert all(torch.equal(s, h[:, T:]) for s, h in zip(stripped.hidden_states, out.hidden_states))
    assert torch.equal(stripped.pooler_output, out.pooler_output)
    assert out.last_hidden_state.shape[1] == T + X.shape[1]  # the original is untouched
    with pytest.raises(ValueError, match="no 50 prompt positions"):
        strip_prompt(out, 50)
    with pytest.raises(ValueError, match="exceed the model's 32 positions"):
        model(input_ids=torch.ones(1, 32 - T + 1, dtype=torch.long))
    assert model(input_ids=torch.ones(1, 32 - T, dtype=torch.long)).last_hidden_state.shape[1] == 32


def test_bert_sequence_and_token_classification():
    seq = add_prompt_tuning(fresh("bert_seqcls"), T)
    assert seq.prompt_tuning.task_type == "SEQ_CLS"
    assert seq.prompt_tuning.modules_to_save == ["classifier", "score", "pre_classifier"]  # PEFT >= 0.22's heads
    y = torch.tensor([0, 2])
    out = seq(input_ids=X, attention_mask=MASK, labels=y)  # sequence labels pass unchanged
    assert out.logits.shape == (2, 3) and abs(out.loss.item() - F.cross_entropy(out.logits, y).item()) < 1e-6
    tok = randomize_prompt(add_prompt_tuning(fresh("bert_tokcls"), T))
    labels = torch.randint(0, 5, X.shape).masked_fill(MASK == 0, -100)
    out = tok(input_ids=X, attention_mask=MASK, labels=labels)
    assert out.logits.shape == (2, T + X.shape[1], 5)
    manual = F.cross_entropy(out.logits[:, T:].reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    assert abs(out.loss.item() - manual.item()) < 1e-6
    assert strip_prompt(out, T).logits.shape == (2, X.shape[1], 5)


def test_question_answering_positions_shift():
    model = randomize_prompt(add_prompt_tuning(tiny_bert(transformers.BertForQuestionAnswering), T))
    assert model.prompt_tuning.task_type == "QUESTION_ANS"
    start, end = torch.tensor([1, 3]), torch.tensor([2, 5])
    out = model(input_ids=X, attention_mask=MASK, start_positions=start, end_positions=end)
    assert out.start_logits.shape == (2, T + X.shape[1])
    want = (F.cross_entropy(out.start_logits, start + T) + F.cross_entropy(out.end_logits, end + T)) / 2
    assert abs(out.loss.item() - want.item()) < 1e-6


# ---------------------------------------------------------------------------------------------
# training: only the prompt (and PEFT's task head where it has one) changes


@pytest.mark.parametrize("kind,heads", [("gpt2", None), ("llama", None), ("bert_seqcls", []),
                                        ("bert_seqcls", None), ("bert_tokcls", None)])
def test_training_step_changes_only_the_prompt(kind, heads):
    model = add_prompt_tuning(fresh(kind), T, "vocab", seed=0, modules_to_save=heads)
    head = [] if heads == [] or kind in ("gpt2", "llama") else ["classifier.weight", "classifier.bias"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == head + ["prompt_tuning.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "bert_seqcls":
        labels = torch.tensor([0, 2])
    elif kind == "bert_tokcls":
        labels = torch.randint(0, 5, X.shape)
    else:
        labels = X
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(input_ids=X, attention_mask=MASK, labels=labels).loss
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed == trainable


# ---------------------------------------------------------------------------------------------
# inits


def peft_prompt(kind, init, seed):
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(fresh(kind), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=T, prompt_tuning_init=init))
    return theirs.prompt_encoder["default"].embedding.weight.detach()


@pytest.mark.parametrize("init,peft_init", [("random", "RANDOM"), ("vocab", "SAMPLE_VOCAB")])
def test_random_inits_draw_what_peft_draws(init, peft_init):
    theirs = peft_prompt("gpt2", peft_init, seed=7)
    assert torch.equal(prompt_of(add_prompt_tuning(fresh("gpt2"), T, init, seed=7)), theirs)
    torch.manual_seed(7)  # seed=None: the global RNG, as PEFT
    assert torch.equal(prompt_of(add_prompt_tuning(fresh("gpt2"), T, init)), theirs)
    assert not torch.equal(prompt_of(add_prompt_tuning(fresh("gpt2"), T, init, seed=8)), theirs)
    if init == "vocab":
        table = fresh("gpt2").get_input_embeddings().weight
        assert all((table == row).all(-1).any() for row in theirs)  # rows are token embeddings


def test_token_id_init_repeats_and_truncates_like_peft():
    table = fresh("llama").get_input_embeddings().weight.detach()
    for ids, T_, want in [([5, 6, 7], 8, [5, 6, 7, 5, 6, 7, 5, 6]), ([5, 6, 7], 2, [5, 6]),
                          (torch.tensor([[9, 3]]), 3, [9, 3, 9]), (torch.tensor([4], dtype=torch.int32), 1, [4])]:
        model = add_prompt_tuning(fresh("llama"), T_, ids)
        assert torch.equal(prompt_of(model), table[want])
    init = torch.randn(T, 64)
    assert torch.equal(prompt_of(add_prompt_tuning(fresh("llama"), T, init)), init)


# ---------------------------------------------------------------------------------------------
# PEFT's files both ways


CAUSAL = ("gpt2", "llama")


def task_of(kind):
    return {"bert": "FEATURE_EXTRACTION", "bert_seqcls": "SEQ_CLS"}.get(kind, "CAUSAL_LM")


def outputs(model, kind):
    model.eval()
    with torch.no_grad():
        if kind in CAUSAL:
            out = model(input_ids=X, attention_mask=MASK, labels=X.masked_fill(MASK == 0, -100))
            return out.logits, out.loss
        out = model(input_ids=X, attention_mask=MASK)
        return out.get("logits", out.get("last_hidden_state")), None


def read_config(d):
    with open(os.path.join(d, "adapter_config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "bert_seqcls"])
def test_peft_prompt_loads_here(kind, tmp_path):
    theirs = peft.get_peft_model(fresh(kind), peft.PromptTuningConfig(task_type=task_of(kind), num_virtual_tokens=T))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:  # the prompt, and the classifier copy PEFT trains for SEQ_CLS
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(fresh(kind), tmp_path)
    assert ours.prompt_tuning.task_type == task_of(kind)
    assert torch.equal(prompt_of(ours), theirs.prompt_encoder["default"].embedding.weight)
    (a, la), (b, lb) = outputs(ours, kind), outputs(theirs, kind)
    assert a.shape == b.shape and rel_err(a, b) < 1e-6
    if la is not None:
        assert abs(la.item() - lb.item()) < 1e-6
    assert [n for n, p in ours.named_parameters() if p.requires_grad][-1] == "prompt_tuning.weight"


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "bert_seqcls"])
def test_our_prompt_loads_in_peft(kind, tmp_path):
    ours = add_prompt_tuning(fresh(kind), T, "vocab", seed=3)
    randomize_prompt(ours)
    if kind == "bert_seqcls":
        with torch.no_grad():
            ours.classifier.weight.add_(1.0)  # a trained head travels with the prompt, as in PEFT
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(fresh(kind), tmp_path)
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, prompt_of(ours))
    (a, la), (b, lb) = outputs(ours, kind), outputs(theirs, kind)
    assert a.shape == b.shape and rel_err(a, b) < 1e-6
    if la is not None:
        assert abs(la.item() - lb.item()) < 1e-6
    # the config is the one PEFT writes for the same model
    mine = read_config(tmp_path)
    peft_dir = tmp_path / "peft"
    config = peft.PromptTuningConfig(task_type=task_of(kind), num_virtual_tokens=T, prompt_tuning_init="SAMPLE_VOCAB")
    peft.get_peft_model(fresh(kind), config).save_pretrained(peft_dir)
    written = read_config(peft_dir)
    written.pop("peft_version")
    assert set(mine) == set(written)
    for key, value in written.items():
        if key == "modules_to_save" and value:  # (PEFT < 0.22 does not list DistilBERT's pre_classifier)
            assert set(value) <= set(mine[key]) <= set(value) | {"pre_classifier"}
        else:
            assert mine[key] == value, key


def test_round_trip_into_existing_prompt(tmp_path):
    ours = randomize_prompt(add_prompt_tuning(fresh("llama"), T))
    save_adapter(ours, tmp_path)
    tensors = safetensors_torch.load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (T, 64)
    other = add_prompt_tuning(fresh("llama"), T)
    assert load_adapter(other, tmp_path) is other
    assert torch.equal(prompt_of(other), prompt_of(ours))
    with pytest.raises(ValueError, match="has 5 virtual tokens"):
        load_adapter(add_prompt_tuning(fresh("llama"), 5), tmp_path)
    with pytest.raises(ValueError, match="task_type"):
        load_adapter(add_prompt_tuning(fresh("llama"), T, task_type="FEATURE_EXTRACTION"), tmp_path)
    with pytest.raises(ValueError, match="embedding dim 32"):
        load_adapter(fresh("gpt2"), tmp_path)
    safetensors_torch.save_file({"prompt_embeddings": tensors["prompt_embeddings"], "extra": torch.zeros(1)},
                                os.path.join(tmp_path, "adapter_model.safetensors"))
    plain = fresh("llama")
    with pytest.raises(ValueError, match="extra"):
        load_adapter(plain, tmp_path)
    assert fastpeft.prompt_tuning.get_prompt_tuning(plain) is None  # nothing changed
    both = fastpeft.inject_lora(add_prompt_tuning(fresh("llama"), T), ["q_proj"])
    with pytest.raises(ValueError, match="both"):
        save_adapter(both, tmp_path)


# ---------------------------------------------------------------------------------------------
# errors, copies


class NoEmbeddings(nn.Module):
    def forward(self, input_ids=None, inputs_embeds=None):
        return input_ids


def test_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens must be > 0"):
        add_prompt_tuning(fresh("gpt2"), 0)
    with pytest.raises(ValueError, match=r"\(4, 32\)"):
        add_prompt_tuning(fresh("gpt2"), T, torch.zeros(4, 16))
    for ids in ([1, V], [-1, 2], torch.tensor([V + 5])):
        with pytest.raises(ValueError, match=r"\[0, 128\)"):
            add_prompt_tuning(fresh("gpt2"), T, ids)
    with pytest.raises(ValueError, match="empty"):
        add_prompt_tuning(fresh("gpt2"), T, [])
    with pytest.raises(TypeError, match="ints"):
        add_prompt_tuning(fresh("gpt2"), T, [1.5, 2])
    with pytest.raises(ValueError, match="tokenizer"):
        add_prompt_tuning(fresh("gpt2"), T, "some text")
    with pytest.raises(TypeError, match="get_input_embeddings"):
        add_prompt_tuning(NoEmbeddings(), T)
    with pytest.raises(ValueError, match="task_type"):
        add_prompt_tuning(fresh("gpt2"), T, task_type="CAUSAL")
    with pytest.raises(ValueError, match="selects no module"):
        add_prompt_tuning(fresh("gpt2"), T, modules_to_save=["classifier"])
    model = add_prompt_tuning(fresh("gpt2"), T)
    assert model(input_ids=X).logits.shape[1] == T + X.shape[1]
    with pytest.raises(ValueError, match="already has prompt tuning"):
        add_prompt_tuning(model, T)
    embeds = model.get_input_embeddings()(X)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=X, inputs_embeds=embeds)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 6\)"):
        model(input_ids=X, attention_mask=MASK[:, 1:])
    with pytest.raises(ValueError, match=r"labels has shape \(2, 6\)"):
        model(input_ids=X, labels=X[:, 1:])
    with pytest.raises(ValueError, match=r"\[batch, sequence\] tensor, got shape \(2, 1, 7, 7\)"):
        model(input_ids=X, attention_mask=torch.ones(2, 1, 7, 7))


def test_deepcopy_keeps_its_own_prompt():
    model = randomize_prompt(add_prompt_tuning(fresh("gpt2"), T))
    before = model(input_ids=X).logits
    twin = copy.deepcopy(model)
    randomize_prompt(twin, seed=9)
    assert torch.equal(model(input_ids=X).logits, before)
    assert not torch.equal(twin(input_ids=X).logits, before)


def test_modules_to_save_are_whole_module_names():
    """An entry selects the modules it names (the qualified name equals it or ends with "." + it),
    not every name that ends with its letters: "j" is no module of a Llama, "_proj" neither;
    "q_proj" is both layers' q_proj and nothing else."""
    for entry in ("j", "_proj", "proj", "self_attn.q"):
        with pytest.raises(ValueError, match="selects no module"):
            add_prompt_tuning(fresh("llama"), T, modules_to_save=[entry])
    model = add_prompt_tuning(fresh("llama"), T, modules_to_save=["q_proj", "layers.1.mlp.down_proj"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"prompt_tuning.weight", "model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.weight",
                       "model.layers.1.self_attn.q_proj.bias", "model.layers.1.mlp.down_proj.weight"}
