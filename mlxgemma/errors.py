"""The one exception users see: a single line saying what is wrong and what to do."""


class MlxGemmaError(ValueError):
    """Bad user input (config, weights, token ids, options). The message is one line, fit for a terminal."""
