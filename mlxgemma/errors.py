"""The one exception users see: a single line saying what is wrong and what to do."""


class MlxGemmaError(ValueError):
    """Bad user input (config, weights, token ids, options). The message is one line, fit for a terminal:
    line breaks that reach it from a file (a tensor name, a metadata string) are shown escaped."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))
