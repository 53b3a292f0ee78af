"""HTTP upstreams: the pooled client (`client`) and the request encoding (`encoding`)."""

from ductape_processor.adapters.http.client import (
    HttpClientPool,
    HttpRequest,
    HttpResponse,
    ResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ductape_processor.adapters.http.encoding import header_field, header_name_problem, header_value_problem

__all__ = [
    "HttpClientPool",
    "HttpRequest",
    "HttpResponse",
    "ResponseTooLarge",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "header_field",
    "header_name_problem",
    "header_value_problem",
]
