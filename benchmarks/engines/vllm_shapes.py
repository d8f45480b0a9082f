"""What vLLM built, read from its modules inside the worker (`LLM.apply_model`)."""


def built(model) -> list[list[int]]:
    """[KV heads, FFN width] per layer of vLLM's DeciModel (0 for a no-op sublayer)."""
    out = []
    for layer in model.model.layers:
        kv = 0 if layer._is_no_op_attention else layer.self_attn.total_num_kv_heads
        ffn = 0 if layer._is_no_op_ffn else layer.mlp.down_proj.input_size
        out.append([int(kv), int(ffn)])
    return out
