"""Errors shown to users as one clear line (the CLI prints them without a traceback)."""


class UserError(Exception):
    """A problem with the user's input: a path, a model, an option, a dataset row."""
