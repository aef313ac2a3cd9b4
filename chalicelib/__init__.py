"""Server side of dagcast: what the Lambda functions run."""

__version__ = "0.1.0"
