class UserError(Exception):
    """Bad input from the person at the keyboard: reported as one line, exit status 2, no traceback."""


# errnos of a disk that takes no more: reported as one line, exit status 1, no traceback
UNWRITABLE = {28: "no space left on device", 122: "disk quota exceeded", 30: "read-only file system"}
