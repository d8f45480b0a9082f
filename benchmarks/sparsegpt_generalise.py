"""Does SparseGPT's asymmetric refit generalise? Its strength and damping, chosen on held-out text.

    python benchmarks/sparsegpt_generalise.py                       # smollm2-135m, every setting, llm-compressor beside
    python benchmarks/sparsegpt_generalise.py --settings "default (refit 0.5),refit 1" --no-peer
    python benchmarks/sparsegpt_generalise.py --sources docs,mix --settings "default (refit 0.5),llm-compressor"

The default SparseGPT refits each layer to the dense model's outputs on the calibration text (doc corpus). That cut
KL on the doc windows by 29 % against llm-compressor, but out of domain the lead shrank to about 2 % and task
accuracy fell behind (P5-tasks). Each setting here prunes the same dense model on the same calibration windows,
then is scored by KL against the dense model on four sets: the doc windows (in domain), and out of domain the
stdlib code windows, the zero-shot tasks' contexts and SciQ's supporting passages. The setting is *chosen* on SciQ
alone (text no evaluation here reads, `data.tasks.HELDOUT`), never on the doc, code or task windows; those are
reported beside it. llm-compressor's SparseGPT (its own venv, --peer-python) is the reference row.

`--sources` repeats every setting on each calibration source (`data.SOURCES`: the doc corpus, natural prose from
sets no evaluation reads, or their mix), llm-compressor on the same windows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import trimformer
from trimformer import data
from trimformer.evaluate import Reference

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, out_arg, peer_arg, pick, references, write_results  # noqa: E402
from p1_weights import finish_llmc, start_llmc  # noqa: E402

# name -> SparseGPT settings on top of the target (None: llm-compressor's SparseGPT)
SETTINGS: dict[str, dict | None] = {
    "plain (no refit)": {"asymmetric": False},
    "default (refit 0.5)": {},
    "refit 1": {"refit": 1.0},
    "refit 1 damp 0.1": {"refit_damp": 0.1},
    "refit 1 damp 1": {"refit_damp": 1.0},
    "refit 0.5 damp 0.1": {"refit": 0.5, "refit_damp": 0.1},
    "llm-compressor": None,
}
SETS = ("sciq", "doc", "code", "tasks")  # sciq chooses; the rest are reported


def to_markdown(rows: list[dict], a: argparse.Namespace, chosen: str | None) -> str:
    peers = {r["source"]: r for r in rows if r["name"] == "llm-compressor"}
    head = ["setting", "calibration", "kl sciq (chooses)", "kl doc", "kl code", "kl tasks", "prune s"]
    if peers:
        head.insert(6, "vs llm-compressor, same calibration (sciq / code / tasks)")
    out = [f"SparseGPT {a.target} on {a.model}: {a.calib} calibration windows of 512 tokens; KL vs dense on {a.kl} "
           "windows of 512 tokens per set; the setting is chosen on SciQ's passages only (held-out text).", "",
           "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        q, peer = r["kl"], peers.get(r["source"])
        label = f"{r['name']} / {r['source']}"
        cells = [f"**{r['name']}**" if label == chosen else r["name"], r["source"]] + [f"{q[s]:.4f}" for s in SETS]
        if peers:
            cells.append("" if peer is None or r is peer else " / ".join(
                f"{100 * (q[s] / peer['kl'][s] - 1):+.1f} %" for s in ("sciq", "code", "tasks")))
        cells.append(f"{r['prune_seconds']:.0f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + (f"\n\nChosen on SciQ: {chosen}.\n" if chosen else "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="sparsity=0.5", help="sparsity=S or pattern=N:M (default %(default)s)")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="comma list of: " + ", ".join(SETTINGS).replace("%", "%%"))
    ap.add_argument("--sources", default=data.BUILTIN,
                    help=f"comma list of calibration sources, each with every setting: {', '.join(data.SOURCES)} "
                         "(default %(default)s)")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows (default %(default)s; P1: 64)")
    ap.add_argument("--kl", type=int, default=16, help="KL windows per set (default %(default)s)")
    peer_arg(ap, "/work/venvs/llmc/bin/python")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    out_arg(ap, "sparsegpt_generalise")
    a = ap.parse_args()
    names = pick(a.settings, SETTINGS, "settings")
    sources = pick(a.sources, dict.fromkeys(data.SOURCES), "sources")
    if a.no_peer:
        names = [n for n in names if SETTINGS[n] is not None]
    key, _, value = a.target.partition("=")
    if key not in ("sparsity", "pattern") or not value:
        sys.exit(f"--target {a.target!r}: give sparsity=S or pattern=N:M")
    target = {"sparsity": float(value)} if key == "sparsity" else {"pattern": value}

    dense, tok = trimformer.load(a.model, with_tokenizer=True)
    refs = references(dense, tok, doc=a.kl, code=a.kl, tasks=a.kl)
    refs["sciq"] = Reference(dense, data.evaluation_windows(tok, n=a.kl, length=512, corpus="sciq"))
    del dense
    tmp = tempfile.mkdtemp(prefix="sgpt-gen-")
    rows = []
    for source in sources:
        calib = data.calibration_windows(tok, source, n=a.calib, length=512)
        calib_file = os.path.join(tmp, f"calib-{source}.pt")
        torch.save(calib, calib_file)
        for name in names:
            model = trimformer.load(a.model)
            t0 = time.perf_counter()
            if SETTINGS[name] is None:
                pattern = "0:0" if "sparsity" in target else target["pattern"]
                if "sparsity" in target and target["sparsity"] != 0.5:
                    sys.exit("the llm-compressor row runs at 50 % or N:M only (benchmarks/peers/llmc_prune.py)")
                _, state = finish_llmc(*start_llmc(a.peer_python, calib_file, "sparsegpt", pattern, tmp, model=a.model))
                model.load_state_dict(state, strict=False)
            else:
                trimformer.prune_(model, trimformer.build("sparsegpt", {**target, **SETTINGS[name]}),
                                  calibration=calib, progress=False)
            seconds = time.perf_counter() - t0
            kl = {s: refs[s].score(model)["kl"] for s in SETS}
            rows.append({"name": name, "source": source, "settings": SETTINGS[name], "prune_seconds": seconds,
                         "kl": kl})
            print(f"{name} / {source}: " + ", ".join(f"kl {s} {kl[s]:.4f}" for s in SETS) + f" ({seconds:.0f} s)",
                  file=sys.stderr, flush=True)
            ours = [r for r in rows if r["settings"] is not None]
            best = min(ours, key=lambda r: r["kl"]["sciq"]) if ours else None
            chosen = f"{best['name']} / {best['source']}" if best else None
            result = {"model": a.model, "target": a.target, "calib": a.calib, "sources": sources, "kl_windows": a.kl,
                      "chosen_on_sciq": chosen, "rows": rows, "environment": environment()}
            md = to_markdown(rows, a, chosen)
            write_results(a.out, result, md)  # after every row: an interrupted run keeps what it measured
    print(md)


if __name__ == "__main__":
    main()
