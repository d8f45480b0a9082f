"""The `trimformer` command: thin. Each area adds its subcommands in trimformer/commands/<area>.py."""

from __future__ import annotations

import argparse
import difflib
import sys
import traceback

from .commands import core, fetch, recover, structure, sweep, weights
from .commands import kv as kv_commands
from .commands import tokens as tokens_commands
from .models.load import set_trust_remote_code
from .progress import set_quiet

# One line per area (explicit, no discovery). Each module has `add_commands(subparsers)`.
AREAS = [core, weights, structure, kv_commands, tokens_commands, recover, sweep, fetch]


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error rule: one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"trimformer: error: {message} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="trimformer",
        description="Prune transformer models at every granularity and measure what each cut cost and bought.",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in AREAS:
        area.add_commands(sub)
    for sp in sub.choices.values():  # the global options also after the subcommand
        flags = [f for f in ("--quiet", "-q") if f not in sp._option_string_actions]
        if flags:
            sp.add_argument(*flags, dest="quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        if "--trust-remote-code" not in sp._option_string_actions:
            sp.add_argument("--trust-remote-code", action="store_true", default=argparse.SUPPRESS, help=TRUST_HELP)
    return p


TRUST_HELP = ("run code shipped inside a model folder (config.json auto_map) when loading it; off by default: only a "
              "trimformer_modeling.py identical to what this version writes is used without it")


def method_flags(extra: list[str], known: list[str] = ()) -> list[str]:
    """['--target', 'params=0.8', '--multiple-of=8'] -> ['target=params=0.8', 'multiple_of=8'].

    A flag without a value that is close to one of the command's own options (`known`) is a typo of it."""
    out, i = [], 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ValueError(f"unrecognized argument {flag!r}")
        name, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
                if close:
                    raise ValueError(f"unrecognized argument {flag}: did you mean {close[0]}?")
                raise ValueError(f"{flag} needs a value (method settings are --field VALUE)")
            value, i = extra[i + 1], i + 1
        out.append(f"{name.replace('-', '_')}={value}")
        i += 1
    return out


# What a user can get wrong (a bad value, a missing file, an existing output): one line, exit 2. Anything else
# is a bug in trimformer: its traceback, and a request to report it.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def _unknown(p: argparse.ArgumentParser, sub: argparse.ArgumentParser | None, extra: list[str]) -> str:
    known = list((sub or p)._option_string_actions)
    parts = []
    for flag in extra:
        close = difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.75) if flag.startswith("-") else []
        parts.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    return "unrecognized arguments: " + " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    sub = p._subparsers._group_actions[0].choices.get(args.command) if getattr(args, "command", None) else None
    if extra:
        if getattr(args, "func", None) is None or args.command != "prune":
            (sub or p).error(_unknown(p, sub, extra))
        try:  # `prune --target params=0.8` is `prune --set target=params=0.8`: any method field as a flag
            args.set = list(args.set) + method_flags(extra, list(sub._option_string_actions))
        except ValueError as e:
            sub.error(str(e))
    set_quiet(args.quiet)
    set_trust_remote_code(args.trust_remote_code)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"trimformer: error: {msg}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("trimformer: this is a bug in trimformer, not in your input: please report it with the command above "
              "and this traceback", file=sys.stderr)
        return 1
    finally:
        set_trust_remote_code(False)  # a process-wide default: only for this command


if __name__ == "__main__":
    sys.exit(main())
