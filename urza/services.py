"""Registry writes. Views, tasks and commands call these; nothing else writes models."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from functools import cache
from importlib.metadata import version as package_version
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils.module_loading import import_string

from urza.errors import ApplicationError
from urza.models import Blueprint, Kernel, Tag, kernel_artifact_path
from urza.storage import artifact_save, sha256_hex

logger = logging.getLogger(__name__)

MAX_COMPILE_ATTEMPTS = 3


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@cache
def torch_version() -> str:
    """The torch release kernels are compiled and served for (read without importing torch)."""
    return package_version("torch")


def _field_error(exc: ValueError, *, prefix: str) -> ApplicationError:
    field = getattr(exc, "field", "") or ""
    message = getattr(exc, "message", None) or str(exc)
    if field == prefix or field.startswith(prefix + "."):
        path = field
    else:
        path = f"{prefix}.{field}" if field else prefix
    return ApplicationError(
        f"{path}: {message}", code="invalid", status=400, detail={path: [message]}
    )


def ir_digest(ir: dict) -> str:
    return hashlib.sha256(canonical_json(ir).encode()).hexdigest()


def ir_validate(*, ir: Any) -> dict:
    """Validate a blueprint IR with the configured validator (tezzeret's by default)."""
    validator = import_string(settings.URZA_IR_VALIDATOR)
    try:
        return validator(ir)
    except ValueError as exc:
        raise _field_error(exc, prefix="ir") from exc


def signature_validate(*, ir: dict, signature: Any) -> dict:
    """Check a kernel signature against a blueprint's IR; returns the normalised signature."""
    validator = import_string(settings.URZA_SIGNATURE_VALIDATOR)
    try:
        return validator(ir=ir, signature=signature)
    except ValueError as exc:
        raise _field_error(exc, prefix="signature") from exc


def kernel_param_count(*, ir: dict, signature: Any) -> int:
    """Parameters of the kernel a blueprint compiles to for `signature` (no compile)."""
    counter = import_string(settings.URZA_PARAM_COUNTER)
    try:
        return counter(ir=ir, signature=signature)
    except ValueError as exc:
        raise _field_error(exc, prefix="signature") from exc


def _tags_resolve(tags: Iterable[str]) -> list[Tag]:
    return [Tag.objects.get_or_create(name=t)[0] for t in dict.fromkeys(tags)]


def blueprint_create(
    *,
    name: str,
    version: int,
    ir: Any,
    description: str = "",
    tags: Iterable[str] = (),
    source: str = Blueprint.Source.USER,
    parent: Blueprint | None = None,
    created_by=None,
) -> Blueprint:
    ir = ir_validate(ir=ir)
    digest = ir_digest(ir)
    existing = Blueprint.objects.filter(ir_sha256=digest).first()
    if existing is not None:
        raise ApplicationError(
            f"this IR is already registered as blueprint {existing} ({existing.id})",
            code="duplicate_ir",
            status=409,
            detail={"existing": str(existing.id)},
        )
    if Blueprint.objects.filter(name=name, version=version).exists():
        raise ApplicationError(
            f"blueprint {name}@{version} exists and is immutable; submit version "
            f"{_next_version(name)} instead",
            code="version_exists",
            status=409,
            detail={"version": [f"{name}@{version} exists"]},
        )
    try:
        with transaction.atomic():
            blueprint = Blueprint.objects.create(
                name=name,
                version=version,
                ir=ir,
                ir_sha256=digest,
                description=description,
                source=source,
                parent=parent,
                created_by=created_by if getattr(created_by, "pk", None) else None,
            )
            blueprint.tags.set(_tags_resolve(tags))
    except IntegrityError as exc:
        raise ApplicationError(
            f"blueprint {name}@{version} or an identical IR was registered concurrently",
            code="conflict",
            status=409,
        ) from exc
    logger.info("blueprint created", extra={"blueprint": str(blueprint.id), "blueprint_name": name})
    return blueprint


def _next_version(name: str) -> int:
    latest = Blueprint.objects.filter(name=name).order_by("-version").first()
    return (latest.version + 1) if latest else 1


def blueprint_ensure(
    *,
    name: str,
    version: int,
    ir: dict,
    description: str = "",
    tags: Iterable[str] = (),
    source: str = Blueprint.Source.CATALOGUE,
) -> tuple[Blueprint, bool]:
    """Idempotent registration (catalogue loading): returns (blueprint, created)."""
    ir = ir_validate(ir=ir)
    digest = ir_digest(ir)
    existing = Blueprint.objects.filter(name=name, version=version).first()
    if existing is not None:
        if existing.ir_sha256 != digest:
            raise ApplicationError(
                f"blueprint {name}@{version} is registered with a different IR; "
                "bump the version in the catalogue",
                code="version_exists",
                status=409,
            )
        return existing, False
    blueprint = blueprint_create(
        name=name, version=version, ir=ir, description=description, tags=tags, source=source
    )
    return blueprint, True


def blueprint_retire(*, blueprint: Blueprint) -> Blueprint:
    Blueprint.objects.filter(pk=blueprint.pk).update(status=Blueprint.Status.RETIRED)
    blueprint.refresh_from_db()
    return blueprint


def kernel_cache_key(*, ir_sha256: str, signature: dict) -> str:
    material = canonical_json(
        {
            "ir_sha256": ir_sha256,
            "signature": signature,
            "compiler": settings.ESPER_COMPILER_VERSION,
            "torch": torch_version(),
        }
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _compile_enqueue(kernel_id: str) -> None:
    from esper_site.celery import app

    app.send_task(settings.URZA_COMPILE_TASK, args=[kernel_id], queue="compile")


def kernel_request(
    *, blueprint: Blueprint, signature: Any, enqueue: bool = True
) -> tuple[Kernel, bool]:
    """Get or create the kernel for (blueprint, signature); a new one is queued after commit.

    `enqueue=False` is for callers that compile the new kernel themselves.
    """
    if blueprint.status != Blueprint.Status.ACTIVE:
        raise ApplicationError(
            f"blueprint {blueprint} is {blueprint.status}; request a kernel from an active version",
            code="blueprint_retired",
            status=409,
        )
    signature = signature_validate(ir=blueprint.ir, signature=signature)
    key = kernel_cache_key(ir_sha256=blueprint.ir_sha256, signature=signature)
    kernel = Kernel.objects.filter(cache_key=key).first()
    if kernel is not None:
        return kernel, False
    try:
        with transaction.atomic():
            kernel = Kernel.objects.create(
                blueprint=blueprint,
                signature=signature,
                cache_key=key,
                torch_version=torch_version(),
            )
    except IntegrityError:
        return Kernel.objects.get(cache_key=key), False
    kernel_id = str(kernel.id)
    if enqueue:
        transaction.on_commit(lambda: _compile_enqueue(kernel_id))
    logger.info("kernel requested", extra={"kernel": kernel_id, "blueprint": str(blueprint.id)})
    return kernel, True


def kernel_claim(*, kernel_id: str) -> Kernel | None:
    """Atomically move a kernel into `compiling` and count the attempt.

    A `compiling` row is claimed again only by a redelivered job (its worker died); a job
    that finds the kernel finished, or out of attempts, gets None and does nothing.
    """
    with transaction.atomic():
        kernel = (
            Kernel.objects.select_for_update()
            .filter(pk=kernel_id, status__in=[Kernel.Status.PENDING, Kernel.Status.COMPILING])
            .first()
        )
        if kernel is None:
            return None
        if kernel.attempts >= MAX_COMPILE_ATTEMPTS:
            Kernel.objects.filter(pk=kernel.pk).update(
                status=Kernel.Status.REJECTED,
                error=f"gave up after {kernel.attempts} attempts that did not finish "
                "(worker lost, or an error that may pass, each time)"
                + (f"; the last: {kernel.error}" if kernel.error else ""),
            )
            return None
        Kernel.objects.filter(pk=kernel.pk).update(
            status=Kernel.Status.COMPILING, attempts=F("attempts") + 1
        )
    kernel.refresh_from_db()
    return kernel


def kernel_mark_validated(
    *,
    kernel: Kernel,
    artifact: bytes,
    report: dict,
    param_count: int,
    compile_seconds: float,
) -> bool:
    """Store the artifact, then flip `compiling → validated` once; False if already done."""
    digest = sha256_hex(artifact)
    kernel.artifact_sha256 = digest
    name = artifact_save(name=kernel_artifact_path(kernel, ""), data=artifact)
    updated = Kernel.objects.filter(pk=kernel.pk, status=Kernel.Status.COMPILING).update(
        status=Kernel.Status.VALIDATED,
        artifact=name,
        artifact_sha256=digest,
        size_bytes=len(artifact),
        param_count=param_count,
        validation=report,
        compile_seconds=compile_seconds,
        error="",
    )
    kernel.refresh_from_db()
    return bool(updated)


def kernel_mark_rejected(*, kernel: Kernel, error: str, report: dict | None = None) -> bool:
    updated = Kernel.objects.filter(pk=kernel.pk, status=Kernel.Status.COMPILING).update(
        status=Kernel.Status.REJECTED, error=error[:4000], validation=report or {}
    )
    kernel.refresh_from_db()
    return bool(updated)


def kernel_release(*, kernel: Kernel, error: str = "") -> None:
    """Hand a claimed kernel back to `pending` after a failure that may pass (it will be
    retried); `error` notes what happened (shown while pending, and if the attempts run out)."""
    fields = {"status": Kernel.Status.PENDING}
    if error:
        fields["error"] = error[:4000]
    Kernel.objects.filter(pk=kernel.pk, status=Kernel.Status.COMPILING).update(**fields)


def kernel_retire(*, kernel: Kernel) -> Kernel:
    Kernel.objects.filter(pk=kernel.pk).update(status=Kernel.Status.RETIRED)
    kernel.refresh_from_db()
    return kernel
