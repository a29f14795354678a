"""The one `swarm` console command: finds subcommands through the `swarm.commands` entry points.

The dispatcher never imports a role package itself; each package declares its subcommands in
pyproject.toml, so a role owns its command line.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

# transformers imports torchao (the 'quant' extra) whenever it is installed; on a machine without its
# optional CUDA kernels it logs a "Failed to load ..." warning per kernel, and torch one per enum it
# registers: noise in every command's output, about code no command of ours runs unless --quant asks
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def _commands() -> dict:
    return {ep.name: ep for ep in entry_points(group="swarm.commands")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: swarm COMMAND [ARGS...]\n\ncommands:")
        for name in sorted(commands):
            print(f"  {name}")
        print("\n`swarm COMMAND --help` tells more.")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"swarm: unknown command {name!r}; known: {', '.join(sorted(commands))}", file=sys.stderr)
        return 2
    handler = commands[name].load()
    return int(handler(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
