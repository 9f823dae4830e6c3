"""The standard catalogue is present in every fresh database (the embedded default included).

`manage.py load_catalogue` registers entries added later; both are idempotent.
"""

import hashlib
import json

from django.db import migrations


def load(apps, schema_editor):
    from tezzeret.catalogue import CATALOGUE
    from tezzeret.ir import validate_ir

    Blueprint = apps.get_model("urza", "Blueprint")
    Tag = apps.get_model("urza", "Tag")
    for entry in CATALOGUE:
        if Blueprint.objects.filter(name=entry["name"], version=entry["version"]).exists():
            continue
        ir = validate_ir(entry["ir"])
        canonical = json.dumps(ir, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        blueprint = Blueprint.objects.create(
            name=entry["name"],
            version=entry["version"],
            ir=ir,
            ir_sha256=hashlib.sha256(canonical.encode()).hexdigest(),
            description=entry["description"],
            source="catalogue",
        )
        blueprint.tags.set([Tag.objects.get_or_create(name=t)[0] for t in entry["tags"]])


class Migration(migrations.Migration):
    dependencies = [("urza", "0001_initial")]
    operations = [migrations.RunPython(load, migrations.RunPython.noop)]
