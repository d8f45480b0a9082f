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
