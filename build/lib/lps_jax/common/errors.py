"""The one base class of user errors: bad input or a state the user can fix.

Every error the package raises for a user carries one line that says what to do; the apps catch
`UserError` alone and print it (`error: ...`, exit status 1). It is a `ValueError`, so callers
that caught `ValueError` before keep working.
"""


class UserError(ValueError):
  """Bad input (shapes, names, flags, files) or a busy / inconsistent folder; the message says
  what to do."""


class Diverged(UserError, FloatingPointError):
  """A fit whose loss stopped being finite; the message names the setting to lower."""
