"""Site middleware."""

from __future__ import annotations

from django.http import HttpResponsePermanentRedirect, JsonResponse
from django.middleware.common import CommonMiddleware
from django.utils.http import escape_leading_slashes

from urza.api.errors import error_body


class LengthRequiredMiddleware:
    """A request body sent with `Transfer-Encoding: chunked` gets a 411 in the API's JSON
    error shape. Django reads a body by its Content-Length only, so a chunked body would
    otherwise arrive empty (a misleading "field is required") and escape the body-size
    limit's 413."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            return JsonResponse(
                error_body(
                    "length_required",
                    "chunked request bodies are not supported: send the body with a "
                    "Content-Length header",
                ),
                status=411,
            )
        return self.get_response(request)


class PermanentRedirectKeepingMethod(HttpResponsePermanentRedirect):
    status_code = 308


class SlashCommonMiddleware(CommonMiddleware):
    """Django's CommonMiddleware, but a path missing its trailing slash is redirected with
    308, which keeps the method and body: with 301 a client's POST turns into a GET and the
    body is lost (and under DEBUG Django raises instead)."""

    response_redirect_class = PermanentRedirectKeepingMethod

    def get_full_path_with_slash(self, request):
        return escape_leading_slashes(request.get_full_path(force_append_slash=True))
