"""The `trimformer` command: thin. Each area adds its subcommands in trimformer/commands/<area>.py."""

from __future__ import annotations

import argparse
import sys

from .commands import core, weights

# One line per area (explicit, no discovery). Each module has `add_commands(subparsers)`.
AREAS = [core, weights]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trimformer",
        description="Prune transformer models at every granularity and measure what each cut cost and bought.",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .progress import set_quiet

    set_quiet(args.quiet)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"trimformer: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
