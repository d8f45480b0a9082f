"""Torch-Pruning 1.6.1 side of benchmarks/p1p2_structure.py; runs in the peer's own venv (/work/peers/tp).

Usage: python tp_runner.py MODEL_DIR CALIB.pt RATIO MODE OUT_DIR
MODE ffn: Taylor importance on FFN neurons only (the peer's only usable mode on this GQA model,
issue 6), one dependency group per MLP, the same ratio everywhere.
MODE hidden+ffn: its LLM example's BasePruner with Taylor importance on hidden channels and FFN
(heads kept: pruning GQA heads crashes in 1.6.1).
Writes a Hugging Face checkpoint with the config fixed by hand (BENCHMARK.md) and timing.json.
"""

import json
import sys
import time

import torch
import torch_pruning as tp
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, calib_path, ratio, mode, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    calib = torch.load(calib_path)  # (n, T)
    t0 = time.perf_counter()
    model.zero_grad()
    for ids in calib:  # Taylor: gradients of the LM loss on the calibration windows
        model(input_ids=ids[None], labels=ids[None], use_cache=False).loss.backward()
    imp = tp.importance.GroupTaylorImportance()
    example = calib[:1, :64]
    if mode == "ffn":
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=lambda o: o.logits)
        for layer in model.model.layers:
            gate = layer.mlp.gate_proj
            n = gate.out_features
            group = DG.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=list(range(n)))
            scores = imp(group)  # (n,)
            drop = scores.argsort()[: int(round(n * ratio))].tolist()
            DG.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=drop).prune()
    else:
        pruner = tp.pruner.BasePruner(
            model, example_inputs=example, importance=imp, pruning_ratio=ratio, global_pruning=False,
            ignored_layers=[model.lm_head], output_transform=lambda o: o.logits, round_to=8,
            prune_num_heads=False, prune_head_dims=False,
        )
        pruner.step()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    cfg = model.config  # fixed by hand: the peer leaves the config stale
    cfg.hidden_size = model.model.embed_tokens.weight.shape[1]
    cfg.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    cfg.head_dim = model.model.layers[0].self_attn.head_dim
    cfg.use_cache = True
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    json.dump({"seconds": seconds, "torch_pruning": tp.__version__ if hasattr(tp, "__version__") else "1.6.1"},
              open(f"{out}/timing.json", "w"))


if __name__ == "__main__":
    main()
