"""The KL probe's cost per trial (the unit of search's scoring, FinerCut and width's measured allocation), before
and after batching windows and keeping the head's logsumexp in place, in one process on smollm2-135m.

Scoring a change to block i re-runs blocks i..29 and the head on the cached states; the script times one trial per
chosen block (the MLP silenced) with the probe as it was (one window per forward, the head through autocast and
torch.logsumexp on a fresh fp32 copy) and as it is, alternating the two `--rounds` times so that a busy machine slows
both alike, and reports the median time of each, their ratio and the KL both give (bf16 rounding differs).

    python benchmarks/probe_speed.py --threads 2 -> results/probe_speed.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

import trimformer
from trimformer import data
from trimformer.models import anatomy_of
from trimformer.structure.probe import Probe, silenced


class Before(Probe):
    """The probe before cef12b8: the calibration batch size as given (1), the head's logsumexp on a new tensor."""

    TOKENS = 1
    CHUNK = 1024

    def _lse(self, h: torch.Tensor) -> torch.Tensor:
        with self.compute():
            z = self.anatomy.head(h)
        return torch.logsumexp(z.float(), -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16, help="probe windows (search's default 16)")
    p.add_argument("--length", type=int, default=256, help="tokens per window (search's default 256)")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29], help="blocks whose MLP is silenced")
    p.add_argument("--rounds", type=int, default=3)
    common.threads_arg(p, default=2)
    common.out_arg(p, "probe_speed")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    an = anatomy_of(model)
    windows = data.calibration_windows(tok, n=a.windows, length=a.length)
    probes = {"before": Before(an, windows), "after": Probe(an, windows)}
    times: dict[tuple[int, str], list[float]] = {}
    kl: dict[tuple[int, str], float] = {}
    with open("/proc/loadavg") as f:
        load = [f.read().split()[0]]
    for _ in range(a.rounds):
        for i in a.blocks:
            for name, probe in probes.items():
                with silenced(an.blocks[i], "mlp"):
                    t = time.perf_counter()
                    kl[i, name] = probe.kl_from(i)
                    times.setdefault((i, name), []).append(time.perf_counter() - t)
    with open("/proc/loadavg") as f:
        load.append(f.read().split()[0])
    rows = [{"block": i, "before_s": statistics.median(times[i, "before"]), "after_s": statistics.median(times[i, "after"]),
             "kl_before": kl[i, "before"], "kl_after": kl[i, "after"]} for i in a.blocks]
    for r in rows:
        r["speedup"] = r["before_s"] / r["after_s"]
    settings = {**vars(a), **common.environment(), "load_before_after": load}
    md = [f"# KL probe: one trial (block i's MLP silenced, blocks i..{len(an.blocks) - 1} + head re-run) on smollm2-135m",
          "", f"`python benchmarks/probe_speed.py --threads {a.threads}`: {a.windows} windows x {a.length} tokens, "
          f"median of {a.rounds} alternating rounds, {a.threads} thread(s), load average {load[0]} / {load[1]} "
          "before / after.", "",
          "| block | before s | after s | speedup | KL before | KL after |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['block']} | {r['before_s']:.2f} | {r['after_s']:.2f} | {r['speedup']:.2f} | {r['kl_before']:.5f} | "
           f"{r['kl_after']:.5f} |" for r in rows]
    common.write_results(a.out, {"settings": settings, "rows": rows}, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
