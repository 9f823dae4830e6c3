"""Shared serializer pieces."""

from __future__ import annotations

from rest_framework import serializers


class StrictInputSerializer(serializers.Serializer):
    """Rejects fields it does not know instead of silently dropping them."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {
                        name: ["unknown field; allowed: " + ", ".join(self.fields)]
                        for name in unknown
                    }
                )
        return super().to_internal_value(data)


class JSONObjectField(serializers.JSONField):
    """A JSON field that must hold an object."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not isinstance(value, dict):
            raise serializers.ValidationError("must be a JSON object")
        return value
