"""The one exception type for mistakes a user can fix (bad IDs, bad files, bad settings)."""


class UserError(Exception):
    """Raised with a message that names the file/field/ID and what is wrong.

    The CLI prints it as a single line (no traceback unless --verbose).
    """
