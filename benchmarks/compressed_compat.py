"""Do vanilla transformers + compressed-tensors load trimformer's sparse checkpoints? (real model, both formats)

    PYTHONPATH=src python benchmarks/compressed_compat.py [--peer-python /work/peers/ct14/bin/python]

Prunes smollm2-135m with magnitude (the checkpoint format does not depend on the method) at 50 % unstructured
and at 2:4, exports each with `trimformer export --format compressed-tensors`, then loads it in a separate venv
that has only transformers and compressed-tensors 0.14.0.1 (the last release that ships the sparse
decompressors; it pins transformers 4.x) with `AutoModelForCausalLM.from_pretrained`, and compares its logits
with the pruned model's. Writes benchmarks/results/compressed_compat.{json,md}.

Peer venv: python3 -m venv /work/peers/ct14 && /work/peers/ct14/bin/pip install torch==2.13.0 &&
           /work/peers/ct14/bin/pip install compressed-tensors==0.14.0.1 transformers accelerate psutil
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import out_arg, peer_arg, write_results  # benchmarks/ is on sys.path when run as a script

import trimformer
from trimformer.export.compressed import load_compressed, save_compressed
from trimformer.weights import WEIGHTS

HERE = Path(__file__).resolve().parent  # peers/ct_load.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peer_arg(ap, "/work/peers/ct14/bin/python")
    out_arg(ap, "compressed_compat")
    a = ap.parse_args()
    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    ids = tok("Pruning removes weights; the checkpoint must still load everywhere.", return_tensors="pt").input_ids
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for settings in ({"sparsity": 0.5}, {"pattern": "2:4"}):
            model.load_state_dict(state)
            trimformer.prune_(model, WEIGHTS.build("magnitude", settings), progress=False)
            with torch.no_grad():
                ref = model(input_ids=ids).logits[0]
            out = save_compressed(model, Path(tmp) / "ckpt", tokenizer=tok, overwrite=True)
            fmt = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"]
            dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            file_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            with torch.no_grad():
                ours = load_compressed(out)(input_ids=ids).logits[0]
            logits_file = Path(tmp) / "peer_logits.pt"
            peer_rows = []
            for via in ("from_pretrained", "compressor"):
                r = subprocess.run([a.peer_python, str(HERE / "peers" / "ct_load.py"), str(out), "--ids",
                                    ",".join(map(str, ids[0].tolist())), "--out", str(logits_file), "--via", via],
                                   capture_output=True, text=True)
                peer = {"via": via}
                if r.returncode:
                    peer["error"] = r.stderr.strip().splitlines()[-1][-300:]
                else:
                    peer.update(json.loads(r.stdout.strip().splitlines()[-1]))
                    peer["max_abs_diff"] = (torch.load(logits_file) - ref).abs().max().item()
                peer_rows.append(peer)
            row = {"format": fmt, "pattern": settings.get("pattern", "unstructured 50%"),
                   "safetensors_MB": file_bytes / 2**20, "dense_params_MB": dense_bytes / 2**20,
                   "trimformer_reload_max_abs_diff": (ours - ref).abs().max().item(), "peers": peer_rows}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"command": "PYTHONPATH=src python benchmarks/compressed_compat.py " + " ".join(sys.argv[1:]), "rows": rows}
    outp = Path(a.out)
    lines = ["# Sparse checkpoints from trimformer, loaded by vanilla transformers + compressed-tensors", "",
             f"`{report['command']}`", "",
             "| format | pattern | file MB (dense fp32 params MB) | loader | max abs logit diff vs the pruned model |",
             "| --- | --- | ---: | --- | ---: |"]
    for r in rows:
        size = f"{r['safetensors_MB']:.0f} ({r['dense_params_MB']:.0f})"
        lines.append(f"| {r['format']} | {r['pattern']} | {size} | trimformer `load_compressed` | "
                     f"{r['trimformer_reload_max_abs_diff']:.2e} |")
        for p in r["peers"]:
            how = ("`AutoModelForCausalLM.from_pretrained`" if p["via"] == "from_pretrained"
                   else "`ModelCompressor.decompress` into the config's model")
            if "error" in p:
                lines.append(f"| {r['format']} | {r['pattern']} | {size} | {how} | failed: {p['error'][-160:]} |")
            else:
                lines.append(f"| {r['format']} | {r['pattern']} | {size} | {how} (transformers {p['transformers']}, "
                             f"compressed-tensors {p['compressed_tensors']}) | {p['max_abs_diff']:.2e} |")
    write_results(outp, report, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
