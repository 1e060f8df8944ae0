"""summarizer-client: the Python client of the Summarizer gRPC service, without the model stack.

    from summarizer_client import SummarizerClient, AsyncSummarizerClient, make_options
"""

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncSummarizerClient": "client", "RetryPolicy": "client", "SummarizerClient": "client",
    "make_options": "client", "CallError": "errors", "ClientError": "errors",
    "code_name": "errors", "ArticleFailure": "results", "ArticleSummary": "results",
    "Result": "results", "StatusCode": "results",
}
__all__ = [  # what _EXPORTS maps, spelled out for static tools
    "ArticleFailure", "ArticleSummary", "AsyncSummarizerClient", "ClientError", "Result",
    "RetryPolicy", "SummarizerClient", "code_name", "make_options",
]


def __getattr__(name: str) -> object:
    # Lazy (PEP 562): `from summarizer_client.results import ...` does not load grpc and the
    # stubs, so the server's core can share the result types without its gRPC layer.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'summarizer_client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
