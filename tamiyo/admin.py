from django.contrib import admin, messages

from tamiyo import services
from tamiyo.models import Experience, PolicyVersion, TrainingRun
from urza.admin import json_display
from urza.errors import ApplicationError


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "owner", "created_at", "updated_at"]
    list_filter = ["status"]
    search_fields = ["name", "id"]
    readonly_fields = [
        "id",
        "model_summary_pretty",
        "config_pretty",
        "metrics_pretty",
        "created_at",
        "updated_at",
    ]
    exclude = ["model_summary", "config", "metrics"]

    model_summary_pretty = json_display("model_summary", "model summary")

    config_pretty = json_display("config", "config")

    metrics_pretty = json_display("metrics", "metrics")


@admin.register(Experience)
class ExperienceAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "run",
        "step",
        "action_short",
        "policy_name",
        "policy_version",
        "reward",
        "created_at",
    ]
    list_filter = ["policy_name", "policy_version", "run__status"]
    search_fields = ["id", "run__name", "run__id"]
    list_select_related = ["run", "policy_version"]
    readonly_fields = [
        "id",
        "run",
        "step",
        "epoch",
        "action_pretty",
        "policy_name",
        "policy_version",
        "behavior_logprob",
        "kernel",
        "outcome_pretty",
        "reward",
        "state_pretty",
        "created_at",
        "updated_at",
    ]
    exclude = ["state", "action", "outcome", "blueprints", "fits"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="action")
    def action_short(self, obj):
        a = obj.action or {}
        if a.get("action") != "germinate":
            return "wait"
        return f"germinate {a.get('layer')}[{a.get('seed')}] bp#{a.get('blueprint_index')}"

    action_pretty = json_display("action", "action")

    outcome_pretty = json_display("outcome", "outcome")

    state_pretty = json_display("state", "state (graph)")


@admin.register(PolicyVersion)
class PolicyVersionAdmin(admin.ModelAdmin):
    list_display = ["version", "is_active", "experience_count", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["version", "checkpoint_sha256"]
    readonly_fields = [
        "version",
        "config_pretty",
        "checkpoint",
        "checkpoint_sha256",
        "metrics_pretty",
        "experience_count",
        "is_active",
        "created_at",
        "updated_at",
    ]
    exclude = ["config", "metrics"]
    actions = ["activate"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Activate the selected policy version (decisions use it)")
    def activate(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(
                request, "select exactly one policy version to activate", messages.ERROR
            )
            return
        version = queryset.get()
        try:
            services.policy_activate(version=version)
        except ApplicationError as exc:
            self.message_user(request, exc.message, messages.ERROR)
            return
        self.message_user(request, f"policy v{version.version} is now active", messages.SUCCESS)

    config_pretty = json_display("config", "config")

    metrics_pretty = json_display("metrics", "metrics")
