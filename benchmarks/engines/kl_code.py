"""P5 serving, the cuts' out-of-domain cost (trimformer's venv): KL(dense || cut) of our PyTorch models on the
first `--windows` stdlib source windows (512 tokens), as the other benchmarks' kl_code column (common.references).

    python benchmarks/engines/kl_code.py OUT.json --dense smollm2-135m --cut width=/work/runs/w --cut depth=...

Cuts already in OUT are kept (not scored again); OUT is rewritten atomically after each cut.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ for common

from common import references  # noqa: E402

from trimformer import load  # noqa: E402
from trimformer.io import atomic_file  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--dense", required=True)
    p.add_argument("--cut", action="append", default=[], help="NAME=CHECKPOINT, repeated")
    p.add_argument("--windows", type=int, default=4)
    a = p.parse_args()
    out = Path(a.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    todo = [c.split("=", 1) for c in a.cut if c.split("=", 1)[0] not in done]
    if not todo:
        return
    dense, tok = load(a.dense, with_tokenizer=True)
    ref = references(dense, tok, doc=1, code=a.windows)["code"]
    del dense
    for name, path in todo:
        done[name] = ref.score(load(path))["kl"]
        atomic_file(out, json.dumps(done, indent=1))
        print(f"{name}: kl_code {done[name]:.3f}", flush=True)


if __name__ == "__main__":
    main()
