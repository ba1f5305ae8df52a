"""`gamguard predict` (not implemented yet)."""
HELP = "(not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    from gamguard.runtime.cli import CommandError

    raise CommandError("'predict' is not implemented yet")
