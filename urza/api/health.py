from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from urza.health import health_report


class HealthzApi(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        responses={
            200: OpenApiResponse(description="all reachable"),
            503: OpenApiResponse(description="something is down; see checks"),
        }
    )
    def get(self, request):
        report = health_report()
        return Response(report, status=200 if report["ok"] else 503)
