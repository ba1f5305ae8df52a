"""`gamguard verify` (not implemented yet)."""
HELP = "(not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    from gamguard.runtime.cli import CommandError

    raise CommandError("'verify' is not implemented yet")
