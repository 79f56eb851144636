"""User-facing errors: the CLI prints ``error: <message>`` on one line and exits with code 2."""


class CPSLError(Exception):
    """Bad input from the user (file, data, config, checkpoint). Message is one clear line."""
