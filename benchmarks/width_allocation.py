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
import torch.nn.functional as F

import trimformer
from trimformer import data


@torch.no_grad()
def kl_to(m, ev: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Mean per-token KL(dense || m) over the evaluation windows `ev`, given the dense log-probs `ref`."""
    kl, n = 0.0, 0
    for w, p in zip(ev, ref):
        q = F.log_softmax(m(input_ids=w[None]).logits[0], -1)
        kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
        n += w.numel()
    return kl / n


def main() -> None:
    torch.set_num_threads(1)
    m0, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    calib = data.calibration_windows(tok, n=int(sys.argv[2]) if len(sys.argv) > 2 else 8, length=512)
    ev = data.evaluation_windows(tok, n=4, length=512)
    with torch.no_grad():
        ref = [F.log_softmax(m0(input_ids=w[None]).logits[0], -1) for w in ev]
    for cfg in json.loads(sys.argv[1]):
        m = copy.deepcopy(m0)
        t = time.time()
        trimformer.prune_(m, trimformer.build("width", cfg), calibration=calib, progress=False)
        r = m.trimformer_history[-1]["result"]
        print(json.dumps(cfg), round(r["kept"], 4), "kl", round(kl_to(m, ev, ref), 4), "s", round(time.time() - t), r["ffn"], flush=True)


if __name__ == "__main__":
    main()
