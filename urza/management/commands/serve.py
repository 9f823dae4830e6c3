import socket

from django.conf import settings
from django.contrib.staticfiles.management.commands.runserver import Command as RunserverCommand
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.core.servers.basehttp import WSGIServer


class NoDelayWSGIServer(WSGIServer):
    """Sets TCP_NODELAY on each connection: without it every request on a kept-open
    connection waits ~40 ms for a delayed ACK (Nagle), which training-loop polls feel."""

    def get_request(self):
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, addr


class _Runserver(RunserverCommand):
    server_cls = NoDelayWSGIServer


class Command(BaseCommand):
    help = (
        "Run the embedded default: migrate, load the catalogue, start worker threads "
        "(with the in-process broker) and serve the API and admin."
    )

    def add_arguments(self, parser):
        parser.add_argument("addrport", nargs="?", default="127.0.0.1:8000")
        parser.add_argument("--no-worker", action="store_true", help="do not start workers")

    def handle(self, *args, addrport, no_worker, **options):
        call_command("migrate", interactive=False, verbosity=0)
        call_command("load_catalogue", verbosity=1)
        if not no_worker:
            if settings.ESPER_EMBEDDED_BROKER:
                from esper_site.embedded import start_worker_threads

                start_worker_threads()
                self.stdout.write("worker threads consuming queues compile, train")
            else:
                self.stdout.write(
                    "served broker configured: start workers with "
                    "`celery -A esper_site worker -Q compile,train`"
                )
        call_command(
            _Runserver(),
            addrport,
            use_reloader=False,
            use_threading=True,
            insecure_serving=True,
        )
