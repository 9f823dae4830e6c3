from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from tezzeret.services import kernel_compile
from urza import services as urza_services
from urza.errors import ApplicationError
from urza.models import Blueprint, Kernel


def _signatures(blueprint: Blueprint, *, dims, channels, dtype) -> list[dict]:
    ir = blueprint.ir
    sizes = channels if ir["layout"] == "channels" else dims
    return [
        {"graft": ir["graft"], "layout": ir["layout"], "in": n, "out": n, "dtype": dtype}
        for n in sizes
    ]


class Command(BaseCommand):
    help = (
        "Compile every active catalogue blueprint (or --blueprint NAME ...) for a list of "
        "signatures: features layouts for each --dims D (in = out = D), channel layouts for "
        "each --channels C. Queues the jobs on the workers, or compiles here with --inline."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dims", type=int, nargs="*", default=[64, 128, 256])
        parser.add_argument("--channels", type=int, nargs="*", default=[16, 32, 64])
        parser.add_argument("--dtype", default="float32")
        parser.add_argument(
            "--blueprint", nargs="*", default=None, help="names (default: catalogue)"
        )
        parser.add_argument("--inline", action="store_true", help="compile in this process")

    def handle(self, *args, dims, channels, dtype, blueprint, inline, **options):
        blueprints = Blueprint.objects.filter(status=Blueprint.Status.ACTIVE)
        if blueprint:
            blueprints = blueprints.filter(name__in=blueprint)
            missing = set(blueprint) - set(blueprints.values_list("name", flat=True))
            if missing:
                raise CommandError(f"no active blueprint named {', '.join(sorted(missing))}")
        else:
            blueprints = blueprints.filter(source=Blueprint.Source.CATALOGUE)
        jobs = [
            (bp, sig)
            for bp in blueprints
            for sig in _signatures(bp, dims=dims, channels=channels, dtype=dtype)
        ]
        if not jobs:
            raise CommandError("nothing to compile: no blueprint fits the given sizes")
        counts: dict[str, int] = {}
        for bp, sig in tqdm(jobs, desc="kernels", unit="kernel", disable=None):
            try:
                kernel, _ = urza_services.kernel_request(
                    blueprint=bp, signature=sig, enqueue=not inline
                )
            except ApplicationError as exc:
                self.stderr.write(f"{bp} {sig}: {exc.message}")
                counts["refused"] = counts.get("refused", 0) + 1
                continue
            if inline and kernel.status == Kernel.Status.PENDING:
                kernel = kernel_compile(kernel_id=str(kernel.id)) or kernel
                kernel.refresh_from_db()
                if kernel.status == Kernel.Status.REJECTED:
                    self.stderr.write(f"{bp} {sig}: rejected: {kernel.error}")
            counts[kernel.status] = counts.get(kernel.status, 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        self.stdout.write(f"{len(jobs)} kernels: {summary}")
