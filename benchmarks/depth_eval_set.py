"""Score a given depth cut (sublayers silenced, which equals removing them) on P1's evaluation windows:
ppl_doc on 64 windows, kl_doc / top-1 on the first 16, as benchmarks/p1p2_structure.py measures them.

    PYTHONPATH=src python benchmarks/depth_eval_set.py '[[3,"attn"],[3,"mlp"],[5,"attn"], ...]'
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch

import trimformer
from trimformer import data
from trimformer.evaluate import Reference, perplexity
from trimformer.models import anatomy_of
from trimformer.structure.probe import silenced


def main() -> None:
    cut = [tuple(u) for u in json.loads(sys.argv[1])]
    torch.set_num_threads(1)
    dense, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    an = anatomy_of(dense)
    ev = data.evaluation_windows(tok, n=64, length=512)
    ref = Reference(dense, ev[:16], dtype=torch.float16)  # as p1p2_structure keeps them
    with contextlib.ExitStack() as st:
        for i, k in cut:
            st.enter_context(silenced(an.blocks[i], k))
        k = ref.score(dense)
        out = {"set": cut, "ppl_doc": perplexity(dense, ev, progress=False), "kl": k["kl"], "top1_agree": k["top1_agree"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
