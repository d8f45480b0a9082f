"""CLI subcommands, one module per area; each exposes `add_commands(subparsers)`."""


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
