"""Recovery: distillation that keeps masks, shapes and frozen parts; resume; NaN safety; LoRA merge."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import transformers as T
from conftest import VOCAB, tiny

import trimformer
from trimformer.evaluate.quality import kl_top1
from trimformer.recover import NonFiniteLossError, RecoverConfig, cubic_sparsity, recover_
from trimformer.recover import checkpoint as ckpt
from trimformer.recover import lora as lora_mod
from trimformer.recover.loss import block_map


def windows(n: int = 8, length: int = 16, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)  # (n, T)


def pruned_pair(pattern: str = "unstructured"):
    teacher = tiny("llama")
    student = copy.deepcopy(teacher)
    trimformer.prune_(student, trimformer.build("wanda", {"sparsity": 0.5, "pattern": pattern}),
                      calibration=windows(4, 16), progress=False)
    return student, teacher


def zeros_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() == 0 for n, p in model.named_parameters() if p.dim() == 2 and (".layers." in n or ".h." in n)}


def losses(model) -> list[float]:
    return model.trimformer_history[-1]["result"]["losses"]


@pytest.mark.parametrize("loss", ["kl", "kl+hidden"])
def test_identical_teacher_gives_zero_loss(loss):
    student = tiny("llama")
    teacher = copy.deepcopy(student)
    recover_(student, teacher, windows(), RecoverConfig(steps=1, batch_size=2, loss=loss), progress=False)
    assert losses(student) == [0.0]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masks_shapes_and_frozen_parts_are_kept(pattern):
    student, teacher = pruned_pair(pattern)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    zeros = zeros_of(student)
    frozen = "model.layers.1.self_attn.o_proj.weight"
    student.get_parameter(frozen).requires_grad_(False)
    recover_(student, teacher, windows(), RecoverConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=0), progress=False)
    after = dict(student.named_parameters())
    assert {n: p.shape for n, p in after.items()} == {n: p.shape for n, p in before.items()}
    for n, z in zeros.items():
        assert torch.equal(after[n].detach() == 0, z), n  # same zeros, no more, no fewer
    assert torch.equal(after[frozen], before[frozen]) and not after[frozen].requires_grad
    trained = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(after[trained], before[trained]) and after[trained].requires_grad
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # train='blocks'
    if pattern == "2:4":
        W = after[trained].detach().view(-1, 4)  # (groups, 4)
        assert ((W != 0).sum(-1) <= 2).all()


def smaller_student(teacher, intermediate: int = 64, layers: int = 1):
    """A physically smaller student: first `intermediate` FFN neurons and the first `layers` blocks."""
    cfg = copy.deepcopy(teacher.config)
    cfg.intermediate_size, cfg.num_hidden_layers = intermediate, layers
    student = T.LlamaForCausalLM(cfg).eval()
    sd = teacher.state_dict()
    with torch.no_grad():
        for n, p in student.state_dict().items():
            src = sd[n]
            p.copy_(src[tuple(slice(0, s) for s in p.shape)])  # slice of the teacher's tensor
    return student


def test_physically_smaller_student_with_fewer_blocks_gets_closer():
    teacher = tiny("llama")
    student = smaller_student(teacher)
    data = windows(8, 16)
    shapes = {n: p.shape for n, p in student.named_parameters()}
    kl0 = kl_top1(student, teacher, data, progress=False)["kl"]
    recover_(student, teacher, data, RecoverConfig(steps=12, batch_size=4, lr=3e-3, loss="kl+hidden+lm", warmup_steps=0),
             progress=False)
    kl1 = kl_top1(student, teacher, data, progress=False)["kl"]
    assert {n: p.shape for n, p in student.named_parameters()} == shapes
    assert kl1 < 0.8 * kl0


def test_block_map_spreads_student_blocks_over_teacher_blocks():
    assert block_map(4, 4) == [0, 1, 2, 3]
    assert block_map(2, 6) == [2, 5]
    assert block_map(1, 2) == [1]
    with pytest.raises(ValueError, match="hidden_map"):
        block_map(2, 4, [0, 9])


def test_resume_repeats_the_same_next_steps(tmp_path):
    cfg = dict(steps=6, batch_size=3, lr=3e-3, warmup_steps=2)
    teacher = tiny("llama")
    ref = smaller_student(teacher, layers=2)
    recover_(ref, teacher, windows(5), RecoverConfig(**cfg), progress=False)  # uninterrupted

    interrupted = smaller_student(teacher, layers=2)
    calls = {"n": 0}

    def stop_at_fifth(module, args, out):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    h = interrupted.model.norm.register_forward_hook(stop_at_fifth)  # (the head is fused into the loss)
    with pytest.raises(KeyboardInterrupt):
        recover_(interrupted, teacher, windows(5), RecoverConfig(**cfg, checkpoint_dir=str(tmp_path), checkpoint_every=2),
                 progress=False)
    h.remove()
    assert [s for s, _ in ckpt.steps_in(tmp_path)] == [2, 4]

    resumed = smaller_student(teacher, layers=2)  # a fresh process would reload the same input model
    recover_(resumed, teacher, windows(5), RecoverConfig(**cfg, checkpoint_dir=str(tmp_path), checkpoint_every=2),
             progress=False)
    assert resumed.trimformer_history[-1]["result"]["resumed_from"] == 4
    assert losses(resumed) == losses(ref)  # bit-identical losses, steps 5 and 6 included
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n

    with pytest.raises(ValueError, match="other settings"):
        recover_(smaller_student(teacher, layers=2), teacher, windows(5),
                 RecoverConfig(**{**cfg, "lr": 1e-3}, checkpoint_dir=str(tmp_path)), progress=False)


def test_nan_loss_stops_cleanly_and_keeps_last_checkpoint(tmp_path):
    student, teacher = pruned_pair()
    calls = {"n": 0}

    def nan_at_sixth(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 6 else out

    student.model.norm.register_forward_hook(nan_at_sixth)
    zeros = zeros_of(student)
    with pytest.raises(NonFiniteLossError, match=r"step 6.*step-000004"):
        recover_(student, teacher, windows(), RecoverConfig(steps=10, batch_size=2, lr=1e-3, checkpoint_dir=str(tmp_path),
                                                            checkpoint_every=2, keep_checkpoints=5), progress=False)
    assert [s for s, _ in ckpt.steps_in(tmp_path)] == [2, 4]
    state = ckpt.load(tmp_path / "step-000004")
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in state["params"].values())
    assert all(torch.isfinite(p).all() for p in student.parameters())  # weights of step 5, never touched by NaN
    assert all(torch.equal(student.get_parameter(n) == 0, z) for n, z in zeros.items())
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written checkpoint


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored (in, out)
def test_lora_merge_gives_the_adapter_models_logits_and_keeps_masks(family):
    student = tiny(family)
    trimformer.prune_(student, trimformer.build("wanda", {"sparsity": 0.5}), calibration=windows(4, 16), progress=False)
    zeros = zeros_of(student)
    ids = windows(2, 16)
    anatomy = trimformer.anatomy_of(student)
    handle = lora_mod.attach(student, anatomy, set(zeros), rank=4, alpha=8.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # adapters start at B = 0; make them do something
        with_adapters = student(input_ids=ids).logits
    handle.merge_()
    merged = student(input_ids=ids).logits
    assert not any("lora" in n for n, _ in student.named_modules())
    assert torch.allclose(merged, with_adapters, atol=1e-5)
    assert all(torch.equal(student.get_parameter(n) == 0, z) for n, z in zeros.items())
    assert all(p.requires_grad for p in student.parameters())


def test_lora_recovery_trains_and_keeps_masks():
    student, teacher = pruned_pair()
    zeros = zeros_of(student)
    before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
    recover_(student, teacher, windows(), RecoverConfig(steps=4, batch_size=2, lora_rank=4, lr=1e-2, warmup_steps=0),
             progress=False)
    after = student.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(after, before)
    assert all(torch.equal(student.get_parameter(n) == 0, z) for n, z in zeros.items())
    assert type(student.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_gradient_checkpointing_gives_the_same_training():
    a, teacher = pruned_pair()
    b = copy.deepcopy(a)
    cfg = dict(steps=2, batch_size=2, lr=1e-3, loss="kl+hidden")
    recover_(a, teacher, windows(), RecoverConfig(**cfg), progress=False)
    recover_(b, teacher, windows(), RecoverConfig(**cfg, gradient_checkpointing=True), progress=False)
    assert not b.is_activation_checkpointing
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_gradual_magnitude_pruning_follows_the_cubic_schedule():
    assert cubic_sparsity(0, 0.0, 0.8, 0, 10) == 0.0 and cubic_sparsity(10, 0.0, 0.8, 0, 10) == 0.8
    assert cubic_sparsity(5, 0.0, 0.8, 0, 10) == pytest.approx(0.8 - 0.8 / 8)
    student = tiny("llama")
    teacher = copy.deepcopy(student)
    recover_(student, teacher, windows(), RecoverConfig(steps=8, batch_size=2, gmp_sparsity=0.5, gmp_end=0.5, gmp_every=2),
             progress=False)
    sp = student.trimformer_history[-1]["result"]["sparsity"]
    assert len(sp) == 14 and all(abs(s - 0.5) < 1e-3 for s in sp.values())  # 2 blocks x 7 projections
    W = student.model.layers[1].mlp.down_proj.weight
    assert abs((W == 0).float().mean().item() - 0.5) < 1e-3


def test_bad_input_gets_clear_errors():
    student, teacher = pruned_pair()
    with pytest.raises(ValueError, match="token windows"):
        recover_(student, teacher, torch.rand(4, 16), RecoverConfig(steps=1))
    with pytest.raises(ValueError, match="vocabulary"):
        recover_(student, teacher, torch.full((2, 8), VOCAB + 5), RecoverConfig(steps=1))
    with pytest.raises(ValueError, match="terms"):
        RecoverConfig(loss="kl+mse")
    with pytest.raises(ValueError, match="LoRA"):
        RecoverConfig(gmp_sparsity=0.5, lora_rank=8)
    with pytest.raises(ValueError, match="steps"):
        RecoverConfig(steps=0)
    for p in student.model.layers.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        recover_(student, teacher, windows(), RecoverConfig(steps=1))


def test_checkpoints_keep_only_the_newest(tmp_path):
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, {"step": step}, keep=2)
    assert [s for s, _ in ckpt.steps_in(tmp_path)] == [2, 3]
    shutil.rmtree(tmp_path / "step-000003")
    assert ckpt.latest(tmp_path).name == "step-000002"


def test_slimfit_freezes_the_least_moving_blocks(tmp_path):
    student, teacher = pruned_pair()
    cfg = RecoverConfig(steps=6, batch_size=2, lr=1e-2, warmup_steps=0, freeze_fraction=0.5, freeze_at=1 / 3,
                        checkpoint_dir=str(tmp_path), checkpoint_every=2, keep_checkpoints=5)
    recover_(student, teacher, windows(), cfg, progress=False)
    frozen = student.trimformer_history[-1]["result"]["frozen_blocks"]
    assert len(frozen) == 1  # half of 2 blocks, chosen at step 2
    at_freeze = ckpt.load(tmp_path / "step-000002")["params"]
    assert ckpt.load(tmp_path / "step-000002")["freezer"]["frozen"] == frozen
    moved = ckpt.load(tmp_path / "step-000002")["freezer"]["moved"]
    assert moved[frozen[0]] == min(moved.values())
    for n, p in student.named_parameters():
        if n in at_freeze and n.startswith("model.layers."):
            same = torch.equal(p, at_freeze[n])
            assert same == (int(n.split(".")[2]) in frozen), n  # frozen block unchanged since step 2, others moved
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_prune_recover_cycles_grow_the_mask_and_heal_between_cuts(tmp_path):
    from trimformer.recover import prune_recover_cycles_

    teacher = tiny("llama")
    student = copy.deepcopy(teacher)
    prune_recover_cycles_(student, teacher, windows(), "wanda", [0.25, 0.5],
                          RecoverConfig(steps=2, batch_size=2, lr=1e-3, checkpoint_dir=str(tmp_path), checkpoint_every=2),
                          progress=False)
    after_first = ckpt.load(tmp_path / "cycle-0" / "step-000002")["masks"]  # keep-masks after cycle 1's recovery
    for n, keep in after_first.items():
        assert not (student.get_parameter(n)[~keep] != 0).any(), n  # what was cut stays cut
    methods = [h["method"] for h in student.trimformer_history]
    assert methods == ["wanda", "recover", "wanda", "recover"]
    first = student.trimformer_history[1]["result"]["sparsity"]
    final = student.trimformer_history[3]["result"]["sparsity"]
    assert all(abs(v - 0.25) < 0.02 for v in first.values()) and all(abs(v - 0.5) < 1e-6 for v in final.values())
    with pytest.raises(ValueError, match="increasing"):
        prune_recover_cycles_(student, teacher, windows(), "wanda", [0.5, 0.25])


def test_batches_depend_on_the_step_only_and_split_across_processes():
    from trimformer.recover.train import window_rows

    one = [window_rows(10, s, 4, seed=0).tolist() for s in range(5)]  # 20 samples of 10 windows = 2 epochs
    assert sorted(sum(one[:2], []) + one[2][:2]) == list(range(10))  # each epoch is a permutation
    assert one == [window_rows(10, s, 4, seed=0).tolist() for s in range(5)]
    two = [window_rows(10, 0, 2, seed=0, rank=r, world=2).tolist() for r in (0, 1)]
    assert two[0] + two[1] == one[0]  # two processes share the global batch without overlap


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_given_masks_are_applied_and_kept(lora_rank):
    student = tiny("llama")
    teacher = copy.deepcopy(student)
    name = "model.layers.0.mlp.gate_proj"
    keep = torch.rand(student.get_parameter(name + ".weight").shape, generator=torch.Generator().manual_seed(0)) > 0.3
    recover_(student, teacher, windows(), RecoverConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0, lora_rank=lora_rank),
             masks={name: keep}, progress=False)
    W = student.get_parameter(name + ".weight")
    assert torch.equal(W != 0, keep)
    assert student.trimformer_history[-1]["result"]["sparsity"][name + ".weight"] == pytest.approx(1 - keep.float().mean().item())
    with pytest.raises(ValueError, match="names no trained parameter"):
        recover_(student, teacher, windows(), RecoverConfig(steps=1), masks={"model.nope": keep})



def test_filter_fn_trains_only_the_modules_it_accepts():
    student, teacher = pruned_pair()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    zeros = zeros_of(student)
    seen = set()

    def mlp_only(module, name):
        seen.add(name)
        return ".mlp." in name

    cfg = RecoverConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0)
    recover_(student, teacher, windows(), cfg, filter_fn=mlp_only, progress=False)
    assert "model.layers.0.self_attn.q_proj" in seen and "model.layers.1.mlp.down_proj" in seen
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if ".mlp." in n}  # every MLP weight moved, nothing else did
    assert all(torch.equal(student.get_parameter(n) == 0, z) for n, z in zeros.items())

    # LoRA: adapters only on the accepted projections
    student, teacher = pruned_pair()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    recover_(student, teacher, windows(), RecoverConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0, lora_rank=2),
             filter_fn=lambda m, n: n.endswith("up_proj"), progress=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)}

    with pytest.raises(ValueError, match="filter_fn accepts no module"):
        recover_(student, teacher, windows(), cfg, filter_fn=lambda m, n: n == "lm_head", progress=False)
    with pytest.raises(ValueError, match="none of the block projections"):
        recover_(student, teacher, windows(), RecoverConfig(steps=1, lora_rank=2),
                 filter_fn=lambda m, n: "norm" in n, progress=False)


def test_recipe_recover_step_honours_filter_fn():
    model = tiny("llama")
    dense = copy.deepcopy(model)
    recipe = trimformer.Recipe.from_obj([
        {"method": "wanda", "sparsity": 0.5},
        {"method": "recover", "steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "teacher": "dense"},
    ])
    attention = lambda module, name: ".self_attn." in name  # noqa: E731
    trimformer.prune_(model, recipe, calibration=windows(), filter_fn=attention, progress=False)
    wanda = trimformer.prune_(copy.deepcopy(dense), trimformer.build("wanda", {"sparsity": 0.5}),
                              calibration=windows(), filter_fn=attention, progress=False)
    for (n, p), q in zip(model.named_parameters(), wanda.parameters()):
        assert torch.equal(p, q) != (".self_attn." in n and p.dim() == 2), n  # cut and healed there only
