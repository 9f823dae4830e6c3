from django.core.management.base import BaseCommand, CommandError

from tezzeret.catalogue import CATALOGUE
from urza.errors import ApplicationError
from urza.services import blueprint_ensure


class Command(BaseCommand):
    help = "Register the standard blueprint catalogue (idempotent)."

    def handle(self, *args, **options):
        created = 0
        for entry in CATALOGUE:
            try:
                _, was_created = blueprint_ensure(
                    name=entry["name"],
                    version=entry["version"],
                    ir=entry["ir"],
                    description=entry["description"],
                    tags=entry["tags"],
                )
            except ApplicationError as exc:
                raise CommandError(f"{entry['name']}: {exc.message}") from exc
            created += was_created
        self.stdout.write(f"catalogue: {len(CATALOGUE)} blueprints, {created} newly registered")
