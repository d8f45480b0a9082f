"""Records the losses and final weights of small recovery and token-distillation runs, and compares two
records: for refactors of the training loop that must not change what it computes.

    PYTHONPATH=src python benchmarks/recover_equivalence.py --out new.json           # this checkout
    PYTHONPATH=/path/to/old/src python benchmarks/recover_equivalence.py --out old.json
    python benchmarks/recover_equivalence.py --compare old.json new.json

Runs (all deterministic, CPU, one thread): recovery on the tests' tiny random LLaMA / GPT-2 (full
fine-tuning, kl+hidden+lm on a smaller student, LoRA, gradual magnitude pruning, group lasso, SlimFit
freezing, a cached teacher, whole logits, a resumed run, a filter-free recipe step), merge-aware
distillation on the tiny random BERT (all / norms / LoRA) and a few steps on minilm-l6 with the P4
training paragraphs. Each run records its losses (as float hex, so "equal" means bit-identical) and a
SHA-256 of every trained tensor.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def record(model: torch.nn.Module) -> dict:
    r = model.trimformer_history[-1]["result"]
    return {"losses": [float(x).hex() for x in r["losses"]], "steps_run": r["steps_run"], "weights": weights_hash(model)}


def windows(n: int = 8, length: int = 16, seed: int = 3) -> torch.Tensor:
    from conftest import VOCAB

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)  # (n, T)


def recover_runs() -> dict[str, dict]:
    from conftest import tiny

    import trimformer
    from trimformer.recover import RecoverConfig, recover_

    def pruned(family: str = "llama"):
        teacher = tiny(family)
        student = copy.deepcopy(teacher)
        trimformer.prune_(student, trimformer.build("wanda", {"sparsity": 0.5}), calibration=windows(4, 16),
                          progress=False)
        return student, teacher

    runs = {
        "full-kl": ("llama", dict(steps=6, batch_size=3, lr=3e-3, warmup_steps=2)),
        "full-kl-gpt2": ("gpt2", dict(steps=4, batch_size=2, lr=1e-3, weight_decay=0.01)),
        "kl+hidden+lm": ("llama", dict(steps=5, batch_size=2, lr=3e-3, loss="kl+hidden+lm", temperature=2.0)),
        "whole-logits": ("llama", dict(steps=4, batch_size=2, lr=1e-3, loss="kl+lm", loss_chunk=0)),
        "lora": ("llama", dict(steps=5, batch_size=2, lr=1e-2, lora_rank=4, warmup_steps=1)),
        "gmp": ("llama", dict(steps=8, batch_size=2, gmp_sparsity=0.7, gmp_end=0.5, gmp_every=2)),
        "lasso": ("llama", dict(steps=6, batch_size=2, lr=1e-2, warmup_steps=0, group_lasso=5.0)),
        "freeze": ("llama", dict(steps=6, batch_size=2, lr=1e-2, warmup_steps=0, freeze_fraction=0.5, freeze_at=1 / 3)),
        "all-params": ("llama", dict(steps=3, batch_size=4, lr=1e-3, train="all", max_grad_norm=0.0)),
    }
    out = {}
    for name, (family, cfg) in runs.items():
        student, teacher = pruned(family)
        recover_(student, teacher, windows(), RecoverConfig(**cfg), progress=False)
        out[name] = record(student)

    with tempfile.TemporaryDirectory() as tmp:
        student, teacher = pruned()
        recover_(student, teacher, windows(6, 16), RecoverConfig(steps=5, batch_size=2, lr=1e-3, loss="kl+hidden",
                                                                  teacher_cache=f"{tmp}/t.safetensors"), progress=False)
        out["teacher-cache"] = record(student)

    with tempfile.TemporaryDirectory() as tmp:  # interrupted after 4 of 6 steps, then resumed
        cfg = dict(steps=6, batch_size=3, lr=3e-3, warmup_steps=2, checkpoint_dir=tmp, checkpoint_every=2)
        student, teacher = pruned()
        calls = {"n": 0}

        def stop_at_fifth(module, args, out):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt

        h = student.model.norm.register_forward_hook(stop_at_fifth)
        try:
            recover_(student, teacher, windows(5), RecoverConfig(**cfg), progress=False)
        except KeyboardInterrupt:
            pass
        h.remove()
        resumed, _ = pruned()
        recover_(resumed, teacher, windows(5), RecoverConfig(**cfg), progress=False)
        out["resumed"] = record(resumed)

    model = tiny("llama")
    recipe = trimformer.Recipe.from_obj([
        {"method": "wanda", "sparsity": 0.25},
        {"method": "recover", "steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "teacher": "dense"},
    ])
    trimformer.prune_(model, recipe, calibration=windows(), progress=False)
    out["recipe-step"] = {"losses": [float(x).hex() for x in model.trimformer_history[-1]["result"]["losses"]],
                          "weights": weights_hash(model)}
    return out


def distill_api():
    try:
        from trimformer.recover import DistillConfig, distill_merge_
    except ImportError:  # before the trainer moved to recover/
        from trimformer.tokens.distill import DistillConfig, distill_merge_
    try:
        from trimformer.data import training_paragraphs
    except ImportError:
        from trimformer.tokens.distill import training_paragraphs
    return DistillConfig, distill_merge_, training_paragraphs


def distill_runs(minilm_steps: int) -> dict[str, dict]:
    from conftest import tiny

    import trimformer

    DistillConfig, distill_merge_, training_paragraphs = distill_api()
    g = torch.Generator().manual_seed(5)
    data = []
    for _ in range(40):
        n = int(torch.randint(10, 29, (1,), generator=g))
        data.append(torch.cat([torch.tensor([1]), torch.randint(3, 128, (n,), generator=g), torch.tensor([2])]))
    merge = {"keep": 0.4, "features": "hidden"}
    out = {}
    for name, cfg in {
        "tiny-all": dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, loss="cos+sim+rank"),
        "tiny-norms": dict(steps=4, batch_size=8, train="norms", loss="cos+mse"),
        "tiny-lora": dict(steps=4, batch_size=8, train="lora", lora_rank=2),
    }.items():
        model = tiny("bert")
        distill_merge_(model, "merge", data, DistillConfig(**cfg), settings=merge, progress=False)
        out[name] = record(model)
    if minilm_steps:
        model, tok = trimformer.load("minilm-l6", with_tokenizer=True)
        paragraphs = training_paragraphs(tok)
        cfg = DistillConfig(steps=minilm_steps, batch_size=16, lr=3e-5, loss="cos+sim+rank")
        distill_merge_(model, "merge", paragraphs, cfg, settings={"keep": 0.02, "threshold": 0.47, "features": "hidden"},
                       progress=False)
        out["minilm-l6"] = {**record(model), "paragraphs": len(paragraphs)}
    return out


def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name:<16} only in {'the first' if name in a else 'the second'} record")
            bad += 1
            continue
        la = [float.fromhex(x) for x in a[name]["losses"]]
        lb = [float.fromhex(x) for x in b[name]["losses"]]
        same_w = a[name]["weights"] == b[name]["weights"]
        if la == lb and same_w:
            verdict = "bit-identical losses and weights"
        else:
            bad += 1
            diff = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)), default=float("nan"))
            verdict = (f"DIFFER: {len(la)} vs {len(lb)} losses, max rel diff {diff:.2e}, "
                       f"weights {'same' if same_w else 'differ'}")
        print(f"{name:<16} {len(la):>3} steps  {verdict}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the record of this checkout here (JSON)")
    p.add_argument("--minilm-steps", type=int, default=5, help="token-distillation steps on minilm-l6 (0: skip)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two records")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("give --out or --compare")
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    import trimformer

    result = {**recover_runs(), **distill_runs(args.minilm_steps)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{len(result)} runs from {Path(trimformer.__file__).parent} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
