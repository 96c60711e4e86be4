class UserError(Exception):
    """Bad input from the person at the keyboard: reported as one line, exit status 2, no traceback."""
