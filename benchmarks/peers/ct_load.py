"""Load a compressed-tensors sparse checkpoint with vanilla transformers + compressed-tensors (in their own venv).

Used by benchmarks/compressed_compat.py as a subprocess with a venv that has compressed-tensors 0.14 (the last
release that still ships the sparse compressors) and the transformers it pins. Prints one JSON line: the logits
of the given token ids (as a list) and the versions used.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--ids", required=True, help="comma-separated token ids")
    p.add_argument("--out", required=True, help="torch file for the logits")
    p.add_argument("--via", choices=["from_pretrained", "compressor"], default="from_pretrained",
                   help="compressor: build the dense model from its config, then compressed-tensors' "
                        "ModelCompressor.decompress fills it (the library's own reader, without transformers' quantizer)")
    a = p.parse_args()
    import compressed_tensors
    import transformers
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if a.via == "from_pretrained":
        # run_compressed=False: decompress into dense Linear weights (transformers' path for sparse-only checkpoints)
        model = AutoModelForCausalLM.from_pretrained(a.path, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(run_compressed=False))
    else:
        from compressed_tensors.compressors import ModelCompressor
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(a.path)
        compressor = ModelCompressor.from_compression_config(config.quantization_config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        compressor.decompress(model_path=a.path, model=model)
        model.tie_weights()
    ids = torch.tensor([[int(t) for t in a.ids.split(",")]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    torch.save(logits, a.out)
    print(json.dumps({"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
                      "model_class": type(model).__name__}))


if __name__ == "__main__":
    main()
