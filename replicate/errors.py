"""The one exception type for mistakes a user can fix.

    replicate run nosuchtask --arch resnet18   # -> "error: ..." and exit code 2

Raised where bad input enters (folders, images, arch names, weights, devices);
`cli.py` turns it into a one-line message and exit code 2, never a traceback.
"""


class ReplicateError(Exception):
    """A problem with the user's input or environment, with a message saying what to do."""
