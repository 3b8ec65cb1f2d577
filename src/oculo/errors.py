"""Every failure oculo reports, and the one mapping from a failure to status and OpenAI error JSON.

The tree::

    OculoError                      base; carries message, param, and (class-level) status/type/code
     +-- InvalidRequest             400 invalid_request_error  invalid_value
     |    +-- InvalidJSON           400                        invalid_json
     |    +-- ImageURLNotSupported  400                        image_url_not_supported
     |    +-- InvalidImage          400                        invalid_image
     |    +-- UnsupportedImageFormat 400                       unsupported_image_format
     |    +-- TooManyImages         400                        too_many_images
     |    +-- ContextLengthExceeded 400                        context_length_exceeded
     |    +-- UnsupportedParameter  400                        unsupported_parameter
     +-- RequestTooLarge            413 invalid_request_error  request_too_large
     +-- AuthenticationFailed       401 authentication_error   invalid_api_key
     +-- PermissionDenied           403 permission_error       model_not_allowed
     +-- ModelNotFound              404 invalid_request_error  model_not_found
     +-- NotFound                   404 invalid_request_error  not_found
     +-- MethodNotAllowed           405 invalid_request_error  method_not_allowed
     +-- RateLimited                429 rate_limit_error       rate_limit_exceeded  (Retry-After)
     +-- Overloaded                 503 server_error           overloaded           (Retry-After)
     +-- EngineUnavailable          503 server_error           engine_unavailable   (Retry-After)
     +-- EngineError                500 server_error           engine_error
     +-- StorageUnavailable         503 server_error           storage_unavailable  (Retry-After)
     +-- UpstreamRejected           400 invalid_request_error  upstream_rejected
     +-- UpstreamError              502 server_error           upstream_error
     +-- UpstreamTimeout            504 server_error           upstream_timeout

The three `Upstream*` errors belong to remote models (`engine = "remote"`): they say that the
server oculo forwarded the request to failed or refused it, not oculo itself.

Nothing else in oculo names a status code: routers and middleware raise these, and
`oculo.api.responses.error_response` turns them into responses.
"""

from __future__ import annotations

from typing import Any, ClassVar


class OculoError(Exception):
    """A failure that becomes an OpenAI-shaped error response."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(OculoError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class ImageURLNotSupported(InvalidRequest):
    code = "image_url_not_supported"


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class UnsupportedImageFormat(InvalidRequest):
    code = "unsupported_image_format"


class TooManyImages(InvalidRequest):
    code = "too_many_images"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class RequestTooLarge(OculoError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class AuthenticationFailed(OculoError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(OculoError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(OculoError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(OculoError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(OculoError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(OculoError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(OculoError):
    status = 503
    type = "server_error"
    code = "overloaded"


class EngineUnavailable(OculoError):
    status = 503
    type = "server_error"
    code = "engine_unavailable"


class EngineError(OculoError):
    status = 500
    type = "server_error"
    code = "engine_error"


class StorageUnavailable(OculoError):
    """The accounts database or the rate-limit store did not answer: nothing is served unbilled."""

    status = 503
    type = "server_error"
    code = "storage_unavailable"


class UpstreamRejected(OculoError):
    """The upstream server refused the forwarded request (a 4xx other than 408/429)."""

    status = 400
    type = "invalid_request_error"
    code = "upstream_rejected"


class UpstreamError(OculoError):
    """The upstream server failed: refused the connection, answered 5xx or nonsense, or hung up."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(OculoError):
    """The upstream server did not connect, start or finish its answer in time."""

    status = 504
    type = "server_error"
    code = "upstream_timeout"


def from_exception(exc: BaseException) -> OculoError:
    """Any exception as an OculoError; unknown ones become a 500 that leaks no internals."""
    if isinstance(exc, OculoError):
        return exc
    return OculoError("The server had an error while processing your request.")
