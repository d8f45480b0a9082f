"""Dev comparison of width settings on smollm2-135m (8 calibration windows, KL on 4 evaluation windows).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/width_allocation.py JSON_LIST_OF_SETTINGS [CALIB_WINDOWS]
e.g. '[{"target":"params=0.8","allocation":"measured","precision":"auto"},
       {"target":"params=0.8","allocation":"uniform","precision":"auto"}]'
Prints per setting: the share of parameters kept, kl_doc (4 windows), seconds, FFN widths per block.
"""

import copy
import json
import sys
import time

import torch

import trimformer
from trimformer import data
from trimformer.evaluate import Reference


def main() -> None:
    torch.set_num_threads(1)
    m0, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    calib = data.calibration_windows(tok, n=int(sys.argv[2]) if len(sys.argv) > 2 else 8, length=512)
    ref = Reference(m0, data.evaluation_windows(tok, n=4, length=512))  # kl: mean per-token KL(dense || m)
    for cfg in json.loads(sys.argv[1]):
        m = copy.deepcopy(m0)
        t = time.time()
        trimformer.prune_(m, trimformer.build("width", cfg), calibration=calib, progress=False)
        r = m.trimformer_history[-1]["result"]
        print(json.dumps(cfg), round(r["kept"], 4), "kl", round(ref.score(m)["kl"], 4), "s", round(time.time() - t), r["ffn"], flush=True)


if __name__ == "__main__":
    main()
