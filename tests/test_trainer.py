"""transformers.Trainer with a fastpeft model (fastpeft.AdapterTrainer): checkpoints hold the adapter
files, not the model; resuming from one ends at the LoRA weights of an uninterrupted run; the best
checkpoint and the final save load back. And the base model saved apart from its adapter
(save_pretrained of base_state_dict + save_adapter) loads back with from_pretrained + load_adapter."""
import copy
import logging
import os

import pytest
import torch

import fastpeft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import _hf  # noqa: E402
from _hf import tiny_llama  # noqa: E402

torch_backend = _hf.torch_backend  # the autouse fixture: whole models on the torch path, one thread

STEPS, SAVE_STEPS, BATCH = 6, 3, 4
# the files a Trainer writes for a full model; none may appear in an adapter checkpoint
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json")


def lora_model(seed: int = 0, dropout: float = 0.1):
    """The tiny Llama with LoRA on q/k/v/o (dropout: the resumed run must also restore the RNG)."""
    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return fastpeft.inject_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                                lora_dropout=dropout)


def dataset(n: int = STEPS * BATCH, seq: int = 12):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(out, **kw):
    kw = dict(output_dir=str(out), max_steps=STEPS, save_steps=SAVE_STEPS, save_strategy="steps",
              per_device_train_batch_size=BATCH, learning_rate=1e-2, lr_scheduler_type="linear",
              warmup_steps=0, weight_decay=0.0, seed=0, report_to="none", use_cpu=True, disable_tqdm=True,
              logging_strategy="no", dataloader_num_workers=0) | kw
    return transformers.TrainingArguments(**kw)


def lora_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in fastpeft.lora_state_dict(model).items()}


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


X = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 6-step run, checkpoints at steps 3 and 6: (model, output dir, trainer)."""
    out = tmp_path_factory.mktemp("run")
    model = lora_model()
    trainer = fastpeft.AdapterTrainer(model=model, args=arguments(out), train_dataset=dataset())
    with fastpeft.use_backend("torch"):
        trainer.train()
    return model, out, trainer


def test_checkpoints_hold_the_adapter_not_the_model(uninterrupted):
    model, out, _ = uninterrupted
    assert sorted(os.listdir(out)) == ["checkpoint-3", "checkpoint-6"]
    lora_values = sum(v.numel() for v in fastpeft.lora_state_dict(model).values())
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    for step in (3, 6):
        folder = out / f"checkpoint-{step}"
        files = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                "trainer_state.json", "training_args.bin"} <= files, files
        assert not files & set(MODEL_FILES), files
        adapter_bytes = os.path.getsize(folder / "adapter_model.safetensors")
        # float32 LoRA weights plus the safetensors header, and far below the model's weights
        assert 4 * lora_values <= adapter_bytes < 4 * lora_values + 8192 < model_bytes // 4
        # nothing else in the folder is model-sized: AdamW keeps two moments of the trainable values
        total = sum(os.path.getsize(folder / f) for f in files if os.path.isfile(folder / f))
        assert total < adapter_bytes * 3 + 64 * 1024 < model_bytes


def test_resume_ends_at_the_uninterrupted_weights(uninterrupted, tmp_path):
    model, out, _ = uninterrupted
    final = lora_weights(model)
    step3 = lora_model()
    fastpeft.load_adapter(step3, out / "checkpoint-3")
    assert not all(torch.equal(final[k], v) for k, v in lora_weights(step3).items())  # 3 steps to go

    resumed = lora_model()
    trainer = fastpeft.AdapterTrainer(model=resumed, args=arguments(tmp_path), train_dataset=dataset())
    with fastpeft.use_backend("torch"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert trainer.state.global_step == STEPS
    got = lora_weights(resumed)
    assert got.keys() == final.keys() and len(got) == 2 * 4 * 2  # A, B of q/k/v/o in 2 layers
    for k in final:
        assert torch.equal(got[k], final[k]), k  # bit for bit: same data order, RNG, optimizer state
    assert os.listdir(tmp_path) == ["checkpoint-6"]  # the resumed run saved only what came after step 3
    assert not set(os.listdir(tmp_path / "checkpoint-6")) & set(MODEL_FILES)


def test_resume_restores_trained_biases_and_head(tmp_path):
    """What trains besides LoRA (the LoRA layers' biases, an unfrozen head) is in the checkpoint
    (PEFT's bias / modules_to_save) and comes back on resume: every trained value, bit for bit."""
    def model():
        m = lora_model()
        fastpeft.mark_only_lora_as_trainable(m, bias="lora_only")
        m.lm_head.requires_grad_(True)
        return m

    def trained(m):
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    whole = model()
    fastpeft.AdapterTrainer(model=whole, args=arguments(tmp_path / "a"), train_dataset=dataset()).train()
    resumed = model()
    fastpeft.AdapterTrainer(model=resumed, args=arguments(tmp_path / "b"), train_dataset=dataset()).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    want, got = trained(whole), trained(resumed)
    assert want.keys() == got.keys() and "lm_head.weight" in want and "model.layers.0.self_attn.q_proj.bias" in want
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert not torch.equal(want["lm_head.weight"], tiny_llama().lm_head.weight)  # the head trained


def test_final_adapter_loads_in_fastpeft_and_peft(uninterrupted, tmp_path):
    model, out, trainer = uninterrupted
    trainer.save_model(str(tmp_path))
    assert not set(os.listdir(tmp_path)) & set(MODEL_FILES)
    want = logits(model, X)
    mine = fastpeft.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(mine, X), want)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(theirs, X), want, rtol=1e-5, atol=1e-5)


def test_load_best_model_loads_the_best_adapter(uninterrupted):
    model, out, trainer = uninterrupted
    trainer = copy.copy(trainer)  # the fixture's trainer and model stay as they are
    trainer.model = copy.deepcopy(model)
    trainer.state = copy.deepcopy(trainer.state)
    trainer.state.best_model_checkpoint = str(out / "checkpoint-3")
    trainer._load_best_model()
    step3 = fastpeft.load_adapter(lora_model(), out / "checkpoint-3")
    assert all(torch.equal(v, lora_weights(step3)[k]) for k, v in lora_weights(trainer.model).items())


def test_a_full_checkpoint_is_left_to_trainer(uninterrupted, tmp_path):
    """A checkpoint a plain Trainer wrote (the full model, LoRA keys included) still resumes."""
    model, out, _ = uninterrupted
    plain = transformers.Trainer(model=copy.deepcopy(model), args=arguments(tmp_path / "plain"),
                                 train_dataset=dataset())
    plain.save_model(str(tmp_path / "full"))
    assert "model.safetensors" in os.listdir(tmp_path / "full")
    target = lora_model()
    trainer = fastpeft.AdapterTrainer(model=target, args=arguments(tmp_path / "x"), train_dataset=dataset())
    trainer._load_from_checkpoint(str(tmp_path / "full"))
    assert all(torch.equal(v, lora_weights(model)[k]) for k, v in lora_weights(target).items())


def test_refuses_a_model_without_an_adapter(tmp_path):
    with pytest.raises(ValueError, match=r"model \(LlamaForCausalLM\) has no LoRALinear"):
        fastpeft.AdapterTrainer(model=tiny_llama(), args=arguments(tmp_path), train_dataset=dataset())


def test_mixin_on_another_trainer_subclass(tmp_path):
    class Mine(fastpeft.AdapterCheckpointMixin, transformers.Trainer):
        pass

    model = lora_model()
    Mine(model=model, args=arguments(tmp_path), train_dataset=dataset()).save_model(str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors",
                                                   "training_args.bin"]


# ---------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained: the base and the adapter, each with its own two lines


@pytest.mark.parametrize("merged", [False, True])
def test_save_pretrained_base_and_adapter(tmp_path, merged, caplog):
    model = lora_model(dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    want = logits(model, X)
    if merged:
        for m in model.modules():
            if isinstance(m, fastpeft.LoRALinear):
                m.merge()
    # the documented lines: save
    model.save_pretrained(tmp_path, state_dict=fastpeft.base_state_dict(model))
    fastpeft.save_adapter(model, tmp_path / "adapter")
    # load
    with caplog.at_level(logging.WARNING):
        again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    fastpeft.load_adapter(again, tmp_path / "adapter")
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    assert "UNEXPECTED" not in caplog.text and "MISSING" not in caplog.text
    layer = again.model.layers[0].self_attn.q_proj
    assert type(layer) is fastpeft.LoRALinear and not layer.merged  # fastpeft's layers, not PEFT's
    torch.testing.assert_close(logits(again, X), want, rtol=1e-5, atol=1e-5)
    # the base is the base: the same weights as the model before LoRA
    plain = tiny_llama()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in fastpeft.base_state_dict(again).items())


def test_base_state_dict_keys_and_int8(tmp_path):
    model = lora_model()
    fastpeft.add_adapter(model, "other", r=2, target_modules=["q_proj"])
    keys = set(fastpeft.base_state_dict(model))
    assert keys == set(tiny_llama().state_dict())
    q = fastpeft.quantize_int8(tiny_llama(), threshold=0.0, skip=("lm_head",))
    fastpeft.inject_lora(q, ["q_proj"])
    with pytest.raises(TypeError, match="model.layers.0.self_attn.q_proj.*Int8Linear"):
        fastpeft.base_state_dict(q)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fastpeft.base_state_dict({})
