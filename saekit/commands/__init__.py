"""The ``saekit`` subcommands: each module registers its parser and runs its command."""
