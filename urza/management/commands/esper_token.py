from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Print the API token of USER (creating the user with --create, and the token)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--create", action="store_true", help="create the user if missing")
        parser.add_argument("--superuser", action="store_true", help="make the user a superuser")
        parser.add_argument(
            "--staff",
            action="store_true",
            help="make the user staff (may pin policy versions; not an admin-site superuser)",
        )
        parser.add_argument("--password", help="set this password (for the admin site)")
        parser.add_argument("--rotate", action="store_true", help="replace an existing token")

    def handle(self, *args, username, create, superuser, staff, password, rotate, **options):
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            if not create:
                raise CommandError(f"no user {username!r}; pass --create to make one")
            user = User.objects.create_user(username=username)
        if superuser:
            user.is_staff = user.is_superuser = True
        if staff:
            user.is_staff = True
        if password:
            user.set_password(password)
        user.save()
        if rotate:
            Token.objects.filter(user=user).delete()
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(token.key)
