"""The `petseg` command line's subcommands, one module per group; each exposes ``register(subparsers)``."""
