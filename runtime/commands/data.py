"""`gamguard data` (not implemented yet)."""
HELP = "(not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    from gamguard.runtime.cli import CommandError

    raise CommandError("'data' is not implemented yet")
