"""The one error type users see: a problem in their input, named with its fix.

The CLI prints ``error: <message>`` on one line and exits with code 2 for any ``SpecError``.
"""


class SpecError(ValueError):
    """Bad user input (a model spec, a recipe key, a prompt file, a parameter). One line, with the fix."""
