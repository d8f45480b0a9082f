"""Memory savers of recovery: the chunked head loss equals the whole-logits loss, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny
from test_recover import windows

from trimformer.recover import RecoverConfig, recover_
from trimformer.recover.headloss import head_loss
from trimformer.recover.loss import kl_loss, lm_loss


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_loss_matches_whole_logits_with_gradients(bias):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 7, 16, 50
    head, t_head = torch.nn.Linear(H, V, bias=bias), torch.nn.Linear(H, V, bias=bias)
    hs = torch.randn(B, T, H, generator=g, requires_grad=True)
    ht = torch.randn(B, T, H, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    ref = kl_loss(head(hs), t_head(ht), 2.0) + 0.5 * lm_loss(head(hs), ids)
    ref_grads = torch.autograd.grad(ref, [hs, *head.parameters()])
    loss, parts = head_loss(hs, head, ht, t_head, ids, temperature=2.0, kl_weight=1.0, lm_weight=0.5, chunk=5)
    grads = torch.autograd.grad(3.0 * loss, [hs, *head.parameters()])  # an outer scale reaches every gradient
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl_loss(head(hs), t_head(ht), 2.0).item(), rel=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, 3.0 * b, atol=1e-6)


def test_chunked_and_whole_logits_train_the_same():
    a = tiny("llama")
    teacher = tiny("llama", seed=1)
    b = copy.deepcopy(a)
    cfg = dict(steps=2, batch_size=2, lr=1e-3, loss="kl+lm", train="all", warmup_steps=0)
    recover_(a, teacher, windows(), RecoverConfig(**cfg, loss_chunk=0), progress=False)
    recover_(b, teacher, windows(), RecoverConfig(**cfg, loss_chunk=5), progress=False)
    la, lb = (m.trimformer_history[-1]["result"]["losses"] for m in (a, b))
    assert la == pytest.approx(lb, rel=1e-5)
    assert type(a.lm_head) is torch.nn.Linear and type(b.lm_head) is torch.nn.Linear  # heads put back
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5)  # (float rounding, amplified by Adam's normalisation; lr is 1e-3)


def test_lora_checkpoints_activations_by_default():
    assert RecoverConfig(lora_rank=4).checkpointing and not RecoverConfig().checkpointing
    assert not RecoverConfig(lora_rank=4, gradient_checkpointing=False).checkpointing
    with pytest.raises(ValueError, match="loss_chunk"):
        RecoverConfig(loss_chunk=-1)


RSS_SCRIPT = """
import sys, torch
from trimformer.recover.memory import release_freed_memory
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
big = torch.ones(4 * 1024 * 1024)
del big  # a 16 MiB block freed: glibc's dynamic mmap threshold grows to 16 MiB
if sys.argv[1] == "release":
    assert release_freed_memory()
blocks, small = [], []
for _ in range(64):  # 64 x 1 MiB, each followed by a small live tensor (as between activations)
    blocks.append(torch.ones(256 * 1024))
    small.append(torch.ones(1024))
held = rss()
del blocks
print((held - rss()) // 1024)  # MiB given back to the OS on free
"""


def test_freed_memory_is_returned_to_the_os():
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "release"], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert int(out.split()[-1]) >= 60  # all of it left the process at once
    # (Without the release, how much glibc keeps depends on its version and MALLOC_* settings, so it is not asserted.)
