"""P1 (BENCHMARK.md) for weight pruning on smollm2-135m: trimformer vs llm-compressor, side by side in one run.

    PYTHONPATH=src python benchmarks/p1_weights.py                        # full P1: 64 calib, 64 eval, 16 KL windows
    PYTHONPATH=src python benchmarks/p1_weights.py --calib 8 --eval 8 --kl 4   # a reduced protocol, same for all

llm-compressor 0.14.0.1 runs in its own venv (--peer-python, default /work/peers/llmc/bin/python) as a subprocess
on the same calibration windows; it saves its pruned decoder weights, which this script loads into a fresh copy of
the dense model and evaluates with the same code. Writes benchmarks/results/p1_weights.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trimformer
from trimformer import data
from trimformer.evaluate import Reference, compare, log_probs
from trimformer.models.load import streamable
from trimformer.weights import WEIGHTS

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, out_arg, peer_arg, references, window_args, write_results  # noqa: E402
from peak_memory import make_resident  # noqa: E402

MODEL = "smollm2-135m"
# name -> (trimformer method, settings) or ("llmc", {method, pattern})
METHODS: dict[str, tuple[str, dict]] = {
    "magnitude 50%": ("magnitude", {"sparsity": 0.5}),
    "wanda 50%": ("wanda", {"sparsity": 0.5}),
    "wanda 2:4": ("wanda", {"pattern": "2:4"}),
    "sparsegpt 50%": ("sparsegpt", {"sparsity": 0.5}),  # the default: true-sequential, asymmetric
    "sparsegpt 50% plain": ("sparsegpt", {"sparsity": 0.5, "asymmetric": False}),  # the paper's SparseGPT
    "sparsegpt 50% asymmetric": ("sparsegpt", {"sparsity": 0.5, "asymmetric": True}),
    "sparsegpt 2:4 plain": ("sparsegpt", {"pattern": "2:4", "asymmetric": False}),
    "sparsegpt 2:4 asymmetric": ("sparsegpt", {"pattern": "2:4", "asymmetric": True}),
    "adaptive(kl lam=0.15)+sparsegpt asymmetric 50%": ("adaptive", {"base": "sparsegpt", "sparsity": 0.5, "importance": "kl",
                                                                    "lam": 0.15, "settings": {"asymmetric": True}}),
    "adaptive(kl sublayer lam=0.15)+sparsegpt asymmetric 50%": ("adaptive", {
        "base": "sparsegpt", "sparsity": 0.5, "importance": "kl", "unit": "sublayer", "lam": 0.15,
        "settings": {"asymmetric": True}}),
    "sparsegpt 50% non-sequential": ("sparsegpt", {"sparsity": 0.5, "true_sequential": False}),
    "sparsegpt 50% fp32": ("sparsegpt", {"sparsity": 0.5, "precision": "fp32"}),
    "sparsegpt 50% non-sequential fp32": ("sparsegpt", {"sparsity": 0.5, "true_sequential": False, "precision": "fp32"}),
    "sparsegpt 2:4 fp32": ("sparsegpt", {"pattern": "2:4", "precision": "fp32"}),
    "llmc sparsegpt 50%": ("llmc", {"method": "sparsegpt", "pattern": "0:0"}),
    "sparsegpt 2:4": ("sparsegpt", {"pattern": "2:4"}),
    "llmc sparsegpt 2:4": ("llmc", {"method": "sparsegpt", "pattern": "2:4"}),
    "llmc wanda 50%": ("llmc", {"method": "wanda", "pattern": "0:0"}),
    "llmc owl+sparsegpt 50%": ("llmc", {"method": "sparsegpt", "pattern": "0:0", "profile": "owl"}),
    "llmc owl+wanda 50%": ("llmc", {"method": "wanda", "pattern": "0:0", "profile": "owl"}),
    "owl+sparsegpt 50%": ("owl", {"base": "sparsegpt", "sparsity": 0.5}),
    "owl+wanda 50%": ("owl", {"base": "wanda", "sparsity": 0.5}),
    "global+sparsegpt 50%": ("global", {"base": "sparsegpt", "sparsity": 0.5}),
    "owl(M=8)+sparsegpt 50%": ("owl", {"base": "sparsegpt", "sparsity": 0.5, "M": 8.0}),
    "adaptive+sparsegpt 50%": ("adaptive", {"base": "sparsegpt", "sparsity": 0.5}),
    "adaptive(kl)+sparsegpt 50%": ("adaptive", {"base": "sparsegpt", "sparsity": 0.5, "importance": "kl"}),
    "adaptive(kl lam=0.15)+sparsegpt 50%": ("adaptive", {"base": "sparsegpt", "sparsity": 0.5, "importance": "kl",
                                                          "lam": 0.15}),
}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples this process' RSS every 50 ms while the block runs: peak above the RSS at entry."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()
        self.peak = max(self.peak, rss_bytes())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, ref: Reference) -> dict[str, float]:
    """ppl over every window; KL(dense || pruned) and top-1 agreement over the reference's windows (the first
    ones), from the same forward: a Reference.score beside evaluate.perplexity would run those windows twice."""
    nll, count, kl, agree, kcount = 0.0, 0, 0.0, 0, 0
    for i, ids in enumerate(windows):
        q = log_probs(model, ids)  # (T, V)
        nll += F.nll_loss(q[:-1], ids[1:], reduction="sum").item()
        count += ids.numel() - 1
        if i < len(ref.logp):
            k, a = compare(q, ref.logp[i])
            kl, agree, kcount = kl + k, agree + a, kcount + ids.numel()
    return {"ppl_doc": math.exp(nll / count), "kl_doc": kl / max(kcount, 1), "top1_agree": agree / max(kcount, 1)}


def block_sparsity(model) -> dict[str, float]:
    projs = [p for _, p in trimformer.anatomy_of(model).projections()]
    total = sum(p.weight.numel() for p in projs)
    zeros = sum((p.weight == 0).sum().item() for p in projs)
    return {"prunable_params": total, "prunable_zeros": zeros, "sparsity": zeros / total}


def start_llmc(py: str, calib_file: str, method: str, pattern: str, tmp: str,
               profile: str = "uniform", model: str = MODEL, dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    """llm-compressor on the bundled `model`'s cached HF copy (made by trimformer.load / streamable), loaded in
    `dtype` (the dtype trimformer prunes the same model in)."""
    out = os.path.join(tmp, f"llmc-{method}-{pattern.replace(':', '_')}-{profile}.pt")
    cmd = [py, str(Path(__file__).parent / "peers" / "llmc_prune.py"), "--model", str(streamable(model)),
           "--calib", calib_file, "--method", method, "--pattern", pattern, "--profile", profile, "--dtype", dtype, "--out", out]
    log = open(out + ".log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "MKL_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env), out  # same threads as ours


def finish_llmc(proc: subprocess.Popen, out: str) -> tuple[dict, dict]:
    stdout, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"llm-compressor failed (rc {proc.returncode}):\n{Path(out + '.log').read_text()[-3000:]}")
    info = json.loads(stdout.strip().splitlines()[-1])
    state = torch.load(out)
    os.remove(out)
    return info, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    window_args(ap, calib="--calib", ppl="--eval", kl="--kl", length=True)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS).replace("%", "%%"))
    peer_arg(ap, "/work/peers/llmc/bin/python")
    ap.add_argument("--parallel-peers", action="store_true",
                    help="run llm-compressor jobs concurrently with trimformer's (all times then share the CPU)")
    out_arg(ap, "p1_weights")
    a = ap.parse_args()
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    for n in names:
        if n not in METHODS:
            sys.exit(f"unknown method {n!r}; choose from: {', '.join(METHODS)}")

    dense, tok = trimformer.load(MODEL, with_tokenizer=True)
    calib = data.calibration_windows(tok, n=a.calib, length=a.length)
    evalw = data.evaluation_windows(tok, n=a.eval, length=a.length)
    kl_n = min(a.kl, a.eval)
    ref = references(dense, tok, doc=kl_n, length=a.length)["doc"]
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    # one block's calibration activations: inputs and outputs of the block, (n, T, hidden) each, fp32
    act_bytes = 2 * a.calib * a.length * dense.config.hidden_size * 4
    rows = [{"method": "dense", "seconds": 0.0, "cpu_seconds": 0.0, **evaluate(dense, evalw, ref), **block_sparsity(dense)}]
    print(json.dumps(rows[-1]), flush=True)
    tmp = tempfile.mkdtemp(prefix="p1w-")
    calib_file = os.path.join(tmp, "calib.pt")
    torch.save(calib, calib_file)
    # llm-compressor's CPU solve is slow (~10 s per projection here), so with --parallel-peers its runs start now
    # and go on beside ours: then every time in the table was measured under that shared load.
    peers = {}
    if a.parallel_peers:
        for name in names:
            kind, settings = METHODS[name]
            if kind == "llmc":
                peers[name] = start_llmc(a.peer_python, calib_file, settings["method"], settings["pattern"], tmp,
                                         settings.get("profile", "uniform"))
    order = [n for n in names if METHODS[n][0] != "llmc"] + [n for n in names if METHODS[n][0] == "llmc"] \
        if a.parallel_peers else names
    for name in order:
        kind, settings = METHODS[name]
        model = trimformer.load(MODEL)
        if kind == "llmc":
            try:
                job = peers.get(name) or start_llmc(a.peer_python, calib_file, settings["method"], settings["pattern"], tmp,
                                         settings.get("profile", "uniform"))
                info, state = finish_llmc(*job)
            except RuntimeError as e:  # a failed peer is reported, not fatal to the run
                rows.append({"method": name, "error": str(e)[-500:]})
                print(f"{name}: {str(e)[-500:]}", flush=True)
                continue
            missing = set(state) - set(model.state_dict())
            if missing:
                raise RuntimeError(f"llm-compressor saved unknown tensors: {sorted(missing)[:3]}")
            model.load_state_dict(state, strict=False)
            seconds, cpu, rss_peak = info["seconds"], info.get("cpu_seconds"), info["rss_peak"] - info["rss_base"]
            per_layer = None
        else:
            make_resident(model)
            with PeakRSS() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                trimformer.prune_(model, WEIGHTS.build(kind, settings), calibration=calib, progress=False)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            rss_peak = mem.peak - mem.base
            result = model.trimformer_history[-1]["result"]
            per_layer = {k: round(v, 4) for k, v in result.items()}
        row = {"method": name, "seconds": seconds, "cpu_seconds": cpu, "rss_peak_above_model_MB": rss_peak / 2**20,
               **evaluate(model, evalw, ref), **block_sparsity(model)}
        if per_layer and kind in ("owl", "global"):
            row["per_layer_sparsity"] = per_layer
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_layer_sparsity"}), flush=True)
        del model
        write(a, rows, kl_n, dense_bytes, act_bytes, done=False)  # keep what is measured if the run is cut short
    write(a, rows, kl_n, dense_bytes, act_bytes, done=True)


def write(a: argparse.Namespace, rows: list[dict], kl_n: int, dense_bytes: int, act_bytes: int, done: bool) -> None:
    report = {
        "protocol": {"model": MODEL, "calib_windows": a.calib, "eval_windows": a.eval, "kl_windows": kl_n,
                     "length": a.length, "full_P1": (a.calib, a.eval, kl_n, a.length) == (64, 64, 16, 512),
                     **environment(), "parallel_peers": a.parallel_peers, "dense_model_MB": dense_bytes / 2**20,
                     "one_block_calib_activations_MB": act_bytes / 2**20,
                     "command": "PYTHONPATH=src python benchmarks/p1_weights.py " + " ".join(sys.argv[1:])},
        "complete": done,
        "rows": rows,
    }
    write_results(a.out, report, markdown(report))
    if done:
        print(markdown(report))


def markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [
        f"# P1 weight pruning on {p['model']}",
        "",
        f"Calibration {p['calib_windows']} x {p['length']} tokens; ppl_doc over {p['eval_windows']} evaluation windows, "
        f"kl_doc / top1_agree over the first {p['kl_windows']}; {'full P1' if p['full_P1'] else 'REDUCED protocol'}; "
        + ("" if report.get("complete") else "**run cut short: only the rows below were measured**; ")
        + f"{p['threads']} torch thread(s) on a 2-core machine (times are one run each; other work running beside inflates them: compare ratios; set OMP_NUM_THREADS and MKL_NUM_THREADS together)"
        + ("; llm-compressor jobs ran concurrently with trimformer's, so every time shares the CPU." if p.get("parallel_peers") else "."),
        f"Dense model {p['dense_model_MB']:.0f} MB; one block's calibration activations (in + out) "
        f"{p['one_block_calib_activations_MB']:.0f} MB.",
        "",
        f"`{p['command']}`",
        "",
        "| method | sparsity | ppl_doc | kl_doc | top1_agree | pruning s (wall) | pruning CPU s | peak RSS above model (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][-120:]!r} | | | | | | |")
            continue
        rss = r.get("rss_peak_above_model_MB")
        lines.append(f"| {r['method']} | {r['sparsity']:.3f} | {r['ppl_doc']:.2f} | {r['kl_doc']:.4f} | "
                     f"{r['top1_agree']:.3f} | {r['seconds']:.1f} | {_num(r.get('cpu_seconds'), '.1f')} | {_num(rss, '.0f')} |")
    return "\n".join(lines) + "\n"


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


if __name__ == "__main__":
    main()
