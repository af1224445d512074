"""The one exception a user should ever see: a single line naming the file, key or value at fault."""


class PipelineError(Exception):
    """Bad input or configuration. The message is one line and names what is wrong."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
