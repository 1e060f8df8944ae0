"""summarizer-client: the Python client of the Summarizer gRPC service, without the model stack.

    from summarizer_client import SummarizerClient, AsyncSummarizerClient, make_options
"""

__version__ = "0.1.0"

from .client import (AsyncSummarizerClient, RetryPolicy, SummarizerClient,  # noqa: E402
                     make_options)
from .errors import ClientError, code_name  # noqa: E402
from .results import ArticleFailure, ArticleSummary, Result  # noqa: E402

__all__ = ["ArticleFailure", "ArticleSummary", "AsyncSummarizerClient", "ClientError", "Result",
           "RetryPolicy", "SummarizerClient", "code_name", "make_options"]
