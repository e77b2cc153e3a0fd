"""Errors a user can fix. The CLI prints them as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input or an impossible setting: the message says what, where (file:line, key, value) and what to do."""
