"""summarizer: a gRPC service that writes a summary and a headline for every news article."""

__version__ = "0.1.0"
