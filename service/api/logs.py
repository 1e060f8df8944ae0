"""Log set-up: readable text, or one JSON object per line for log shippers.

Request lines (one per call, from the servicer) carry their figures in `record.request`; the JSON
format puts them at the top level of the object, so a shipper can index `latency_ms` or `status`
without parsing the message.
"""

from __future__ import annotations

import datetime
import json
import logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("transformers", "huggingface_hub", "httpx", "urllib3")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "request", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Root logging for `summarizer serve`: level, format, and quiet third-party loggers."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    try:
        # huggingface_hub gives its logger a handler of its own when imported (and resets its
        # level): each of its warnings then printed twice, once unformatted. Import it now and
        # leave its records to the root handler alone.
        import huggingface_hub.utils.logging  # noqa: F401
    except ImportError:
        pass
    logging.getLogger("huggingface_hub").handlers.clear()
    if level != "DEBUG":
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.ERROR)
