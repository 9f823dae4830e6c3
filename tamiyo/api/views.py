"""Tamiyo API: runs, decisions, experience outcomes and policy versions."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import IsAdminUser
from rest_framework.response import Response

from tamiyo import selectors, services
from tamiyo.models import Experience, PolicyVersion, TrainingRun
from tamiyo.training import MIN_EXPERIENCES
from tezzeret.signature import DTYPES
from urza.api.serializers import JSONObjectField, StrictInputSerializer
from urza.api.views import ERROR_RESPONSES
from urza.errors import ApplicationError


class RunOutputSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(read_only=True, slug_field="username")

    class Meta:
        model = TrainingRun
        fields = [
            "id",
            "name",
            "model_summary",
            "config",
            "status",
            "metrics",
            "owner",
            "created_at",
            "updated_at",
        ]


class ExperienceOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Experience
        fields = [
            "id",
            "run",
            "step",
            "epoch",
            "action",
            "policy_name",
            "policy_version",
            "behavior_logprob",
            "kernel",
            "outcome",
            "reward",
            "created_at",
            "updated_at",
        ]


class PolicyOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = PolicyVersion
        fields = [
            "version",
            "config",
            "checkpoint_sha256",
            "metrics",
            "experience_count",
            "is_active",
            "created_at",
        ]


class RunListCreateApi(GenericAPIView):
    queryset = TrainingRun.objects.none()
    serializer_class = RunOutputSerializer

    class InputSerializer(StrictInputSerializer):
        name = serializers.CharField(max_length=200)
        model_summary = JSONObjectField(required=False, default=dict)
        config = JSONObjectField(required=False, default=dict)

        class Meta:
            ref_name = "RunCreate"

    @extend_schema(responses={200: RunOutputSerializer(many=True), **ERROR_RESPONSES})
    def get(self, request):
        page = self.paginate_queryset(
            selectors.run_list(user=request.user, filters=request.query_params)
        )
        return self.get_paginated_response(RunOutputSerializer(page, many=True).data)

    @extend_schema(request=InputSerializer, responses={201: RunOutputSerializer, **ERROR_RESPONSES})
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        run = services.run_create(**serializer.validated_data, owner=request.user)
        return Response(RunOutputSerializer(run).data, status=status.HTTP_201_CREATED)


class RunDetailApi(GenericAPIView):
    queryset = TrainingRun.objects.none()
    serializer_class = RunOutputSerializer

    class InputSerializer(StrictInputSerializer):
        status = serializers.ChoiceField(choices=TrainingRun.Status.choices, required=False)
        metrics = JSONObjectField(required=False)

        class Meta:
            ref_name = "RunUpdate"

    @extend_schema(responses={200: RunOutputSerializer, **ERROR_RESPONSES})
    def get(self, request, run_id):
        return Response(
            RunOutputSerializer(selectors.run_get(run_id=run_id, user=request.user)).data
        )

    @extend_schema(
        request=InputSerializer,
        responses={200: RunOutputSerializer, 409: OpenApiResponse(), **ERROR_RESPONSES},
    )
    def patch(self, request, run_id):
        run = selectors.run_get(run_id=run_id, user=request.user)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        run = services.run_update(run=run, **serializer.validated_data)
        return Response(RunOutputSerializer(run).data)


class DecisionApi(GenericAPIView):
    queryset = Experience.objects.none()

    class InputSerializer(StrictInputSerializer):
        graph = JSONObjectField()
        policy = serializers.ChoiceField(choices=services.POLICY_NAMES, required=False)
        greedy = serializers.BooleanField(default=False)
        dtype = serializers.ChoiceField(choices=list(DTYPES), default="float32")
        epoch = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)

        class Meta:
            ref_name = "DecisionRequest"

        def validate(self, attrs):
            if attrs.get("greedy") and attrs.get("policy") == "random":
                raise serializers.ValidationError(
                    {"greedy": ["the random policy has no most likely action; drop greedy"]}
                )
            return attrs

    class OutputSerializer(serializers.Serializer):
        experience = serializers.UUIDField()
        action = serializers.CharField()
        layer = serializers.CharField(allow_null=True)
        seed = serializers.IntegerField(allow_null=True)
        blueprint = serializers.UUIDField(allow_null=True)
        kernel = serializers.UUIDField(allow_null=True)
        policy = serializers.CharField()
        policy_version = serializers.IntegerField(allow_null=True)
        logprob = serializers.FloatField()

        class Meta:
            ref_name = "Decision"

    serializer_class = InputSerializer  # for OPTIONS metadata

    @extend_schema(
        request=InputSerializer,
        responses={
            201: OutputSerializer,
            409: OpenApiResponse(description="run finished"),
            **ERROR_RESPONSES,
        },
        description="Tamiyo decides with the active policy (or the named baseline), records "
        "an experience and, for a germinate decision, requests the kernel. With greedy: true "
        "the policy's most likely action is taken instead of a sample (no exploration; the "
        "recorded behaviour log-probability is 0).",
    )
    def post(self, request, run_id):
        run = selectors.run_get(run_id=run_id, user=request.user)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        experience = services.decision_make(
            run=run,
            graph=data["graph"],
            policy_name=data.get("policy"),
            greedy=data["greedy"],
            dtype=data["dtype"],
            epoch=data["epoch"],
        )
        action = experience.action
        body = {
            "experience": experience.id,
            "action": action["action"],
            "layer": action.get("layer"),
            "seed": action.get("seed"),
            "blueprint": action.get("blueprint"),
            "kernel": experience.kernel_id,
            "policy": experience.policy_name,
            "policy_version": experience.policy_version.version
            if experience.policy_version
            else None,
            "logprob": experience.behavior_logprob,
        }
        return Response(self.OutputSerializer(body).data, status=status.HTTP_201_CREATED)


class ExperienceDetailApi(GenericAPIView):
    queryset = Experience.objects.none()
    serializer_class = ExperienceOutputSerializer

    class InputSerializer(StrictInputSerializer):
        outcome = JSONObjectField()

        class Meta:
            ref_name = "ExperienceOutcome"

    @extend_schema(responses={200: ExperienceOutputSerializer, **ERROR_RESPONSES})
    def get(self, request, experience_id):
        experience = selectors.experience_get(experience_id=experience_id, user=request.user)
        return Response(ExperienceOutputSerializer(experience).data)

    @extend_schema(
        request=InputSerializer,
        responses={200: ExperienceOutputSerializer, 409: OpenApiResponse(), **ERROR_RESPONSES},
    )
    def patch(self, request, experience_id):
        experience = selectors.experience_get(experience_id=experience_id, user=request.user)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        experience = services.experience_record_outcome(
            experience=experience, outcome=serializer.validated_data["outcome"]
        )
        return Response(ExperienceOutputSerializer(experience).data)


class PolicyListApi(GenericAPIView):
    queryset = PolicyVersion.objects.none()
    serializer_class = PolicyOutputSerializer

    @extend_schema(responses={200: PolicyOutputSerializer(many=True), **ERROR_RESPONSES})
    def get(self, request):
        page = self.paginate_queryset(PolicyVersion.objects.all())
        return self.get_paginated_response(PolicyOutputSerializer(page, many=True).data)


class PolicyActiveApi(GenericAPIView):
    queryset = PolicyVersion.objects.none()
    serializer_class = PolicyOutputSerializer

    @extend_schema(responses={200: PolicyOutputSerializer, **ERROR_RESPONSES})
    def get(self, request):
        version = PolicyVersion.objects.filter(is_active=True).first()
        if version is None:
            raise ApplicationError(
                "no trained policy is active yet; decisions use the heuristic cold-start "
                "policy (POST /api/v1/policies/train/ once experiences have rewards)",
                code="no_active_policy",
                status=404,
            )
        return Response(PolicyOutputSerializer(version).data)


class PolicyActivateApi(GenericAPIView):
    """Pin a policy version: decisions use it from the next request on (staff only, since it
    changes every run's decisions). The training job activates a candidate only when its
    held-out score is no worse; this is how an operator rolls back, or measures a candidate
    the job kept inactive."""

    queryset = PolicyVersion.objects.none()
    serializer_class = PolicyOutputSerializer
    permission_classes = [IsAdminUser]

    @extend_schema(request=None, responses={200: PolicyOutputSerializer, **ERROR_RESPONSES})
    def post(self, request, version: int):
        found = PolicyVersion.objects.filter(version=version).first()
        if found is None:
            raise ApplicationError(
                f"policy version {version} does not exist (GET /api/v1/policies/ lists them)",
                code="not_found",
                status=404,
            )
        return Response(PolicyOutputSerializer(services.policy_activate(version=found)).data)


class PolicyTrainApi(GenericAPIView):
    queryset = PolicyVersion.objects.none()

    class InputSerializer(StrictInputSerializer):
        seed = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)
        epochs = serializers.IntegerField(min_value=1, max_value=500, required=False)

        class Meta:
            ref_name = "PolicyTrain"

    serializer_class = InputSerializer  # for OPTIONS metadata

    @extend_schema(
        request=InputSerializer,
        responses={202: OpenApiResponse(description="queued"), **ERROR_RESPONSES},
    )
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        count = Experience.objects.filter(reward__isnull=False).count()
        if count < MIN_EXPERIENCES:
            raise ApplicationError(
                f"need at least {MIN_EXPERIENCES} experiences with rewards, have {count}",
                code="too_few_experiences",
                detail={"experiences": count},
            )
        services.policy_train_enqueue(**serializer.validated_data)
        return Response({"queued": True, "experiences": count}, status=status.HTTP_202_ACCEPTED)
