"""Site middleware."""

from __future__ import annotations

from django.http import HttpResponsePermanentRedirect
from django.middleware.common import CommonMiddleware
from django.utils.http import escape_leading_slashes


class PermanentRedirectKeepingMethod(HttpResponsePermanentRedirect):
    status_code = 308


class SlashCommonMiddleware(CommonMiddleware):
    """Django's CommonMiddleware, but a path missing its trailing slash is redirected with
    308, which keeps the method and body: with 301 a client's POST turns into a GET and the
    body is lost (and under DEBUG Django raises instead)."""

    response_redirect_class = PermanentRedirectKeepingMethod

    def get_full_path_with_slash(self, request):
        return escape_leading_slashes(request.get_full_path(force_append_slash=True))
