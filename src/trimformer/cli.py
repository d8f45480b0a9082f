"""The `trimformer` command: thin. Each area adds its subcommands in trimformer/commands/<area>.py."""

from __future__ import annotations

import argparse
import sys

from .commands import core, fetch, recover, structure, weights
from .commands import kv as kv_commands
from .commands import tokens as tokens_commands

# One line per area (explicit, no discovery). Each module has `add_commands(subparsers)`.
AREAS = [core, weights, structure, kv_commands, tokens_commands, recover, fetch]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trimformer",
        description="Prune transformer models at every granularity and measure what each cut cost and bought.",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.add_commands(sub)
    for sp in sub.choices.values():  # --quiet also after the subcommand
        flags = [f for f in ("--quiet", "-q") if f not in sp._option_string_actions]
        if flags:
            sp.add_argument(*flags, dest="quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return p


def method_flags(extra: list[str]) -> list[str]:
    """['--target', 'params=0.8', '--multiple-of=8'] -> ['target=params=0.8', 'multiple_of=8']."""
    out, i = [], 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ValueError(f"unrecognized argument {flag!r}")
        name, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ValueError(f"{flag} needs a value (method settings are --field VALUE)")
            value, i = extra[i + 1], i + 1
        out.append(f"{name.replace('-', '_')}={value}")
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        if getattr(args, "func", None) is None or args.command != "prune":
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        try:  # `prune --target params=0.8` is `prune --set target=params=0.8`: any method field as a flag
            args.set = list(args.set) + method_flags(extra)
        except ValueError as e:
            p.error(str(e))
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
