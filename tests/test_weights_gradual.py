"""Gradual magnitude pruning: cubic schedule, fixed masks between steps, plain loop and transformers.Trainer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.weights.gradual import GradualMagnitude


def _sparsity(model) -> float:
    projs = [p.weight for _, p in trimformer.anatomy_of(model).projections()]
    return sum((W == 0).sum().item() for W in projs) / sum(W.numel() for W in projs)


def test_cubic_schedule_values():
    g = GradualMagnitude(final_sparsity=0.8, initial_sparsity=0.0, start_step=10, end_step=20, frequency=2)
    assert g.sparsity_at(0) == 0.0 and g.sparsity_at(10) == 0.0
    assert g.sparsity_at(15) == pytest.approx(0.8 - 0.8 * 0.5**3)  # halfway: 1 - (1/2)^3 of the way
    assert g.sparsity_at(20) == pytest.approx(0.8) and g.sparsity_at(99) == pytest.approx(0.8)
    vals = [g.sparsity_at(t) for t in range(10, 21)]
    assert vals == sorted(vals)
    assert [t for t in range(25) if g.is_pruning_step(t)] == [10, 12, 14, 16, 18, 20]


def test_plain_loop_reaches_target_and_masks_stay_fixed():
    model = tiny("llama").train()
    gmp = GradualMagnitude(final_sparsity=0.6, start_step=1, end_step=7, frequency=3).attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    for step in range(1, 10):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        gmp.step(step)
        seen.append(_sparsity(model))
    assert seen[-1] == pytest.approx(0.6, abs=1e-3)  # the target at (and after) end_step
    assert seen[5] < 0.55 and seen[6] == pytest.approx(0.6, abs=1e-3)  # pruning steps 1, 4, 7: the target at 7
    # between pruning steps (2, 3 after step 1; 5, 6 after step 4) the optimizer cannot revive pruned weights
    assert seen[1] == pytest.approx(seen[0]) and seen[4] == pytest.approx(seen[3])
    assert seen == sorted(seen)


def test_trainer_callback(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Toy(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(3, 128, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    model = tiny("llama")
    gmp = GradualMagnitude(final_sparsity=0.5, start_step=0, end_step=4, frequency=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Toy(), callbacks=[gmp.callback()]).train()
    assert _sparsity(model) == pytest.approx(0.5, abs=1e-3)


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="end_step"):
        GradualMagnitude(start_step=10, end_step=5)
    with pytest.raises(ValueError, match="above final_sparsity"):
        GradualMagnitude(initial_sparsity=0.6, final_sparsity=0.5)
    with pytest.raises(RuntimeError, match="attach"):
        GradualMagnitude().step(0)
