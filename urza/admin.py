import json

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html

from urza.models import Blueprint, Kernel, Tag


def pretty_json(value) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True))


def json_display(field: str, description: str | None = None):
    """A read-only admin column/field that shows a JSON field indented."""

    @admin.display(description=description or field.replace("_", " "))
    def show(self, obj) -> str:
        return pretty_json(getattr(obj, field))

    return show


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    search_fields = ["name"]


class KernelInline(admin.TabularInline):
    model = Kernel
    fields = ["id", "status", "signature", "size_bytes", "compile_seconds", "created_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Blueprint)
class BlueprintAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "source", "status", "tag_list", "created_at"]
    list_filter = ["status", "source", "tags"]
    search_fields = ["name", "description", "ir_sha256", "id"]
    readonly_fields = [
        "id",
        "name",
        "version",
        "ir_pretty",
        "ir_sha256",
        "source",
        "parent",
        "created_by",
        "created_at",
        "updated_at",
    ]
    fields = readonly_fields[:4] + ["description", "tags", "status"] + readonly_fields[4:]
    inlines = [KernelInline]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("tags")

    @admin.display(description="tags")
    def tag_list(self, obj: Blueprint) -> str:
        return ", ".join(t.name for t in obj.tags.all())

    ir_pretty = json_display("ir", "IR")

    def has_add_permission(self, request) -> bool:
        # New blueprints go through the API or `load_catalogue`, which validate the IR.
        return False


@admin.register(Kernel)
class KernelAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "blueprint",
        "status",
        "signature_short",
        "size_bytes",
        "compile_seconds",
        "attempts",
        "created_at",
    ]
    list_filter = ["status", "blueprint__source", "blueprint__tags", "torch_version"]
    search_fields = ["id", "cache_key", "blueprint__name", "artifact_sha256", "error"]
    list_select_related = ["blueprint"]
    readonly_fields = [
        "id",
        "blueprint",
        "signature_pretty",
        "cache_key",
        "status",
        "download",
        "artifact_sha256",
        "size_bytes",
        "param_count",
        "validation_report",
        "error",
        "attempts",
        "compile_seconds",
        "torch_version",
        "created_at",
        "updated_at",
    ]
    exclude = ["signature", "artifact", "validation"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="signature")
    def signature_short(self, obj: Kernel) -> str:
        s = obj.signature or {}
        return f"{s.get('graft')}/{s.get('layout')} {s.get('in')}→{s.get('out')} {s.get('dtype')}"

    signature_pretty = json_display("signature")
    validation_report = json_display("validation", "validation report")

    @admin.display(description="artifact")
    def download(self, obj: Kernel) -> str:
        if obj.status != Kernel.Status.VALIDATED or not obj.artifact:
            return "—"
        url = reverse("urza-api:kernel-artifact", kwargs={"kernel_id": obj.id})
        return format_html(
            '<a href="{}">download {}.pt2</a> ({} bytes)', url, obj.id, obj.size_bytes
        )
