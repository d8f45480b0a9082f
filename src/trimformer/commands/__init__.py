"""CLI subcommands, one module per area; each exposes `add_commands(subparsers)`."""
