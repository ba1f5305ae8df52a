"""`gamguard bench` (not implemented yet)."""
HELP = "(not implemented yet)"


def add_arguments(parser):
    pass


def run(args):
    from gamguard.runtime.cli import CommandError

    raise CommandError("'bench' is not implemented yet")
