"""Tamiyo's records: training runs, decisions with their outcomes, and policy versions."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class TrainingRun(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running"
        FINISHED = "finished"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    model_summary = models.JSONField(default=dict, blank=True)
    config = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.RUNNING, db_index=True
    )
    metrics = models.JSONField(default=dict, blank=True)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} [{self.status}]"


def policy_checkpoint_path(instance: PolicyVersion, filename: str) -> str:
    return f"policies/v{instance.version}-{instance.checkpoint_sha256[:16]}.safetensors"


class PolicyVersion(models.Model):
    """A trained GNN policy; exactly one version is active (or none: the cold-start policy)."""

    version = models.PositiveIntegerField(unique=True)
    config = models.JSONField(default=dict)
    checkpoint = models.FileField(upload_to=policy_checkpoint_path, max_length=255)
    checkpoint_sha256 = models.CharField(max_length=64)
    metrics = models.JSONField(default=dict, blank=True)
    experience_count = models.PositiveIntegerField(default=0)
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["is_active"], condition=Q(is_active=True), name="one_active_policy"
            )
        ]

    def __str__(self) -> str:
        return f"policy v{self.version}{' (active)' if self.is_active else ''}"


class Experience(models.Model):
    """One decision: the state it saw, what it chose and how likely, and what came of it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="experiences")
    step = models.PositiveBigIntegerField()
    epoch = models.PositiveIntegerField(default=0)
    state = models.JSONField()
    blueprints = models.JSONField(default=list)
    fits = models.JSONField(null=True, blank=True)
    action = models.JSONField()
    policy_version = models.ForeignKey(
        PolicyVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="experiences"
    )
    policy_name = models.CharField(max_length=32)
    behavior_logprob = models.FloatField()
    kernel = models.ForeignKey(
        "urza.Kernel", null=True, blank=True, on_delete=models.SET_NULL, related_name="experiences"
    )
    outcome = models.JSONField(null=True, blank=True)
    reward = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["run", "step"]), models.Index(fields=["reward"])]

    def __str__(self) -> str:
        return f"{self.run_id} step {self.step}: {self.action.get('action')}"
