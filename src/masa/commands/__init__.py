"""Command-line subcommands that belong to no single subpackage (info, sample, demo)."""
