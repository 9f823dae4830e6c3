"""Registry API: one class per operation, nested input/output serializers, one service call."""

from __future__ import annotations

from django.http import FileResponse, HttpResponseNotModified
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response

from urza import selectors, services
from urza.api.serializers import JSONObjectField, StrictInputSerializer
from urza.errors import ApplicationError
from urza.models import Blueprint, Kernel
from urza.selectors import BlueprintFilter, KernelFilter

ERROR_RESPONSES = {
    400: OpenApiResponse(description="invalid input (JSON error shape)"),
    401: OpenApiResponse(description="missing or wrong token"),
    404: OpenApiResponse(description="not found"),
}


class BlueprintOutputSerializer(serializers.ModelSerializer):
    tags = serializers.SlugRelatedField(many=True, read_only=True, slug_field="name")
    created_by = serializers.SlugRelatedField(read_only=True, slug_field="username")

    class Meta:
        model = Blueprint
        fields = [
            "id",
            "name",
            "version",
            "ir",
            "ir_sha256",
            "description",
            "tags",
            "source",
            "parent",
            "status",
            "created_by",
            "created_at",
            "updated_at",
        ]


class KernelOutputSerializer(serializers.ModelSerializer):
    artifact_url = serializers.SerializerMethodField()

    class Meta:
        model = Kernel
        fields = [
            "id",
            "blueprint",
            "signature",
            "cache_key",
            "status",
            "artifact_url",
            "artifact_sha256",
            "size_bytes",
            "param_count",
            "validation",
            "error",
            "attempts",
            "compile_seconds",
            "torch_version",
            "created_at",
            "updated_at",
        ]

    def get_artifact_url(self, kernel: Kernel) -> str | None:
        if kernel.status != Kernel.Status.VALIDATED:
            return None
        path = reverse("urza-api:kernel-artifact", kwargs={"kernel_id": kernel.id})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path


class BlueprintListCreateApi(GenericAPIView):
    queryset = Blueprint.objects.none()
    filterset_class = BlueprintFilter
    serializer_class = BlueprintOutputSerializer

    class InputSerializer(StrictInputSerializer):
        name = serializers.SlugField(max_length=100)
        version = serializers.IntegerField(min_value=1, max_value=2**31 - 1)
        ir = JSONObjectField()
        description = serializers.CharField(
            required=False, allow_blank=True, max_length=10_000, default=""
        )
        tags = serializers.ListField(
            child=serializers.SlugField(max_length=64),
            required=False,
            default=list,
            max_length=32,
        )
        parent = serializers.UUIDField(required=False, allow_null=True, default=None)

        class Meta:
            ref_name = "BlueprintCreate"

    @extend_schema(responses={200: BlueprintOutputSerializer(many=True), **ERROR_RESPONSES})
    def get(self, request):
        queryset = selectors.blueprint_list(filters=request.query_params)
        page = self.paginate_queryset(queryset)
        data = BlueprintOutputSerializer(page, many=True).data
        return self.get_paginated_response(data)

    @extend_schema(
        request=InputSerializer,
        responses={201: BlueprintOutputSerializer, 409: OpenApiResponse(), **ERROR_RESPONSES},
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        parent_id = data.pop("parent")
        parent = _referenced("parent", blueprint_id=parent_id) if parent_id else None
        blueprint = services.blueprint_create(**data, parent=parent, created_by=request.user)
        return Response(BlueprintOutputSerializer(blueprint).data, status=status.HTTP_201_CREATED)


def _referenced(field: str, *, blueprint_id) -> Blueprint:
    """The blueprint a request body names in `field`; one that does not exist is a 400
    naming the field (the request is invalid), not a 404 (the URL exists)."""
    try:
        return selectors.blueprint_get(blueprint_id=blueprint_id)
    except ApplicationError as exc:
        raise ApplicationError(
            exc.message, code="invalid", status=400, detail={field: [exc.message]}
        ) from exc


class BlueprintDetailApi(GenericAPIView):
    queryset = Blueprint.objects.none()
    serializer_class = BlueprintOutputSerializer

    @extend_schema(responses={200: BlueprintOutputSerializer, **ERROR_RESPONSES})
    def get(self, request, blueprint_id):
        blueprint = selectors.blueprint_get(blueprint_id=blueprint_id)
        return Response(BlueprintOutputSerializer(blueprint).data)


class KernelListCreateApi(GenericAPIView):
    queryset = Kernel.objects.none()
    filterset_class = KernelFilter
    serializer_class = KernelOutputSerializer

    class InputSerializer(StrictInputSerializer):
        blueprint = serializers.UUIDField()
        signature = JSONObjectField()

        class Meta:
            ref_name = "KernelRequest"

    @extend_schema(responses={200: KernelOutputSerializer(many=True), **ERROR_RESPONSES})
    def get(self, request):
        queryset = selectors.kernel_list(filters=request.query_params)
        page = self.paginate_queryset(queryset)
        data = KernelOutputSerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(
        request=InputSerializer,
        responses={
            200: KernelOutputSerializer,
            202: KernelOutputSerializer,
            409: OpenApiResponse(description="blueprint retired"),
            **ERROR_RESPONSES,
        },
        description="Get or create by cache key: 200 with the existing kernel, or 202 with "
        "a new one whose compile job is queued after commit.",
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        blueprint = _referenced("blueprint", blueprint_id=serializer.validated_data["blueprint"])
        kernel, created = services.kernel_request(
            blueprint=blueprint, signature=serializer.validated_data["signature"]
        )
        body = KernelOutputSerializer(kernel, context={"request": request}).data
        return Response(body, status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK)


class KernelDetailApi(GenericAPIView):
    queryset = Kernel.objects.none()
    serializer_class = KernelOutputSerializer

    @extend_schema(responses={200: KernelOutputSerializer, **ERROR_RESPONSES})
    def get(self, request, kernel_id):
        kernel = selectors.kernel_get(kernel_id=kernel_id)
        return Response(KernelOutputSerializer(kernel, context={"request": request}).data)


class KernelArtifactApi(GenericAPIView):
    queryset = Kernel.objects.none()

    @extend_schema(
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            304: OpenApiResponse(description="If-None-Match matched the ETag"),
            409: OpenApiResponse(description="kernel not validated"),
            **ERROR_RESPONSES,
        }
    )
    def get(self, request, kernel_id):
        kernel = selectors.kernel_get(kernel_id=kernel_id)
        if kernel.status != Kernel.Status.VALIDATED or not kernel.artifact:
            raise ApplicationError(
                f"kernel {kernel.id} is {kernel.status}; its artifact is served once it is "
                "validated (poll GET /api/v1/kernels/{id}/)",
                code="not_validated",
                status=409,
                detail={"status": kernel.status},
            )
        etag = f'"{kernel.artifact_sha256}"'
        if etag in request.headers.get("If-None-Match", ""):
            response = HttpResponseNotModified()
            response["ETag"] = etag
            return response
        try:
            handle = kernel.artifact.open("rb")
        except FileNotFoundError as exc:
            raise ApplicationError(
                f"artifact of kernel {kernel.id} is missing from storage",
                code="artifact_missing",
                status=410,
            ) from exc
        response = FileResponse(
            handle,
            content_type="application/octet-stream",
            as_attachment=True,
            filename=f"{kernel.id}.pt2",
        )
        response["ETag"] = etag
        response["X-Checksum-SHA256"] = kernel.artifact_sha256
        if kernel.size_bytes is not None:
            response["Content-Length"] = str(kernel.size_bytes)
        return response
