"""Registry models: blueprints (immutable IR) and the kernels compiled from them."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class Tag(models.Model):
    name = models.SlugField(max_length=64, unique=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Blueprint(models.Model):
    """A declarative IR, immutable once created: a change is a new version."""

    class Source(models.TextChoices):
        CATALOGUE = "catalogue"
        USER = "user"
        GENERATED = "generated"

    class Status(models.TextChoices):
        ACTIVE = "active"
        RETIRED = "retired"

    IMMUTABLE_FIELDS = ("name", "version", "ir", "ir_sha256", "source", "parent_id")

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=100)
    version = models.PositiveIntegerField(default=1)
    ir = models.JSONField()
    ir_sha256 = models.CharField(max_length=64, unique=True)
    description = models.TextField(blank=True, default="")
    tags = models.ManyToManyField(Tag, blank=True, related_name="blueprints")
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.USER)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["name", "version"], name="blueprint_name_version_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    def save(self, *args, **kwargs) -> None:
        if not self._state.adding:
            stored = type(self).objects.filter(pk=self.pk).values(*self.IMMUTABLE_FIELDS).first()
            if stored is not None:
                changed = [f for f in self.IMMUTABLE_FIELDS if stored[f] != getattr(self, f)]
                if changed:
                    raise ValueError(
                        f"blueprint {self} is immutable ({', '.join(changed)} changed); "
                        "submit a new version instead"
                    )
        super().save(*args, **kwargs)


def kernel_artifact_path(instance: Kernel, filename: str) -> str:
    return f"kernels/{instance.artifact_sha256[:2]}/{instance.artifact_sha256}.pt2"


class Kernel(models.Model):
    """One blueprint compiled for one signature; also the compile job's record."""

    class Status(models.TextChoices):
        PENDING = "pending"
        COMPILING = "compiling"
        VALIDATED = "validated"
        REJECTED = "rejected"
        RETIRED = "retired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    blueprint = models.ForeignKey(Blueprint, on_delete=models.PROTECT, related_name="kernels")
    signature = models.JSONField()
    cache_key = models.CharField(max_length=64, unique=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    artifact = models.FileField(upload_to=kernel_artifact_path, max_length=255, blank=True)
    artifact_sha256 = models.CharField(max_length=64, blank=True, default="")
    size_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    param_count = models.PositiveBigIntegerField(null=True, blank=True)
    validation = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    compile_seconds = models.FloatField(null=True, blank=True)
    torch_version = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        sig = self.signature or {}
        return f"{self.blueprint_id} {sig.get('graft')}/{sig.get('layout')} {sig.get('in')}->{sig.get('out')} [{self.status}]"
