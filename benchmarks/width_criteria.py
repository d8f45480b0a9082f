"""Dev comparison of width criteria on smollm2-135m at params=0.8 (8 calibration windows, KL on 2 eval windows).

Statistics are collected once on the dense model and reused by every configuration.
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/width_criteria.py JSON_LIST_OF_SETTINGS
A setting "damp" sets the least-squares ridge (importance.LS_DAMP).
"""

import copy
import json
import sys
import time

import torch

import trimformer
from trimformer import data
from trimformer.evaluate import Reference
from trimformer.structure import importance, width


def main() -> None:
    torch.set_num_threads(1)
    m0, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    calib = data.calibration_windows(tok, n=8, length=512)
    ref = Reference(m0, data.evaluation_windows(tok, n=2, length=512))  # kl: mean per-token KL(dense || m)
    t = time.time()
    stats = width.Width(parts="ffn,heads")._statistics(trimformer.anatomy_of(m0), calib, 1, False)
    print("stats", time.time() - t, flush=True)
    width.Width._statistics = lambda self, a, c, bs, p, st=stats: st  # reuse the dense statistics
    for cfg in json.loads(sys.argv[1]):
        importance.LS_DAMP = cfg.pop("damp", 1e-4)
        m = copy.deepcopy(m0)
        trimformer.prune_(m, trimformer.build("width", cfg), calibration=calib, progress=False)
        r = m.trimformer_history[-1]["result"]
        print(cfg, importance.LS_DAMP, round(r["kept"], 3), "kl", round(ref.score(m)["kl"], 4), flush=True)


if __name__ == "__main__":
    main()
