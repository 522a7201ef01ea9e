"""The one exception type the core raises for anything a user did wrong."""


class ModelError(ValueError):
    """A bad architecture, weight, model file or input; the message says what and where."""
