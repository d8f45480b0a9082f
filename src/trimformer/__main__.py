import sys

from .cli import main

if __name__ == "__main__":  # (a process started by spawn imports the main module again: it must not run the CLI)
    sys.exit(main())
