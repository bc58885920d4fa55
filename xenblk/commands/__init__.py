"""One module per `xenblk` subcommand; each defines register(subparsers)."""
