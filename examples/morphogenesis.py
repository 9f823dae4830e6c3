"""The growth experiment shared by `make demo` (examples/demo.py) and benchmarks/growth.py.

Data sets that need no download: scikit-learn's `load_digits` (default; 8×8 digits, 64
features) and, when the optional `mnist1d` package is installed, MNIST-1D generated locally
(40 features). Each is standardised with the training split's statistics and split into
train / validation / test deterministically by seed. Growth decisions are judged on the
validation split only; the test split is read once, after training.

Models: a deliberately too-small MLP (`make_mlp(..., hidden=SMALL_HIDDEN)`) and the static
large one with `LARGE_FACTOR`× its hidden width.

`train()` is a plain PyTorch loop (Adam, shuffled minibatches, fixed epochs). A grown
variant wraps the model with `kasmina.wrap(model, client=EsperClient(url, token))` and
either drives a `Controller` (Tamiyo decides over the REST API; kernels are compiled by the
server's Celery worker, downloaded, grafted and judged) or, with
`Growth(all_at_once=True)`, requests one blueprint's kernel for every seed site from the
registry and grafts them all with `MorphableModel.load_kernel` before the first step.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kasmina import EsperClient, SeedLayer, Stage, wrap
from kasmina.errors import ApiError, KasminaError, RegistryUnavailable

try:  # the public name once kasmina exports it; the module in any case
    from kasmina import Controller
except ImportError:  # pragma: no cover - older kasmina
    from kasmina.controller import Controller

__all__ = [
    "DATASETS",
    "LARGE_FACTOR",
    "SMALL_HIDDEN",
    "Dataset",
    "Growth",
    "RunResult",
    "SetupError",
    "accuracy",
    "activate_policy",
    "active_policy",
    "check_server",
    "count_params",
    "default_budget",
    "list_policies",
    "load_dataset",
    "make_mlp",
    "request_policy_training",
    "train",
    "wait_for_policy",
    "warm_registry",
]

DATASETS = ("digits", "mnist1d")
SMALL_HIDDEN = 8  # the too-small MLP's hidden width
LARGE_FACTOR = 4  # the static large model is this many times wider


class SetupError(RuntimeError):
    """Something outside the training loop is wrong (server, token, data set): say what."""


# -- data --------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val, self.y_test]).max()) + 1

    def sizes(self) -> dict:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def _mnist1d(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise SetupError(
            "--dataset mnist1d needs the optional `mnist1d` package, which is not installed "
            "(`.venv/bin/pip install mnist1d`); the default data set is digits"
        ) from None
    state = np.random.get_state()  # make_dataset seeds numpy's global generator
    try:
        args = get_dataset_args()  # the canonical MNIST-1D: 5,000 samples, generated here
        generated = make_dataset(args)
    finally:
        np.random.set_state(state)
    return generated["x"], generated["y"], generated["x_test"], generated["y_test"]


def load_dataset(name: str = "digits", seed: int = 0, *, val_fraction: float = 0.2) -> Dataset:
    """Standardised train / val / test tensors; the split is fixed by `seed`.

    digits: 20 % test, then `val_fraction` of the rest for validation (stratified).
    mnist1d: its own 1,000-sample test split; `val_fraction` of its training split.
    """
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=0.2, random_state=seed, stratify=y
        )
    elif name == "mnist1d":
        x_rest, y_rest, x_test, y_test = _mnist1d(seed)
    else:
        raise SetupError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction, random_state=seed, stratify=y_rest
    )
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 1e-8, std, 1.0)

    def features(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((a - mean) / std, dtype=torch.float32)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    return Dataset(
        name,
        features(x_train),
        labels(y_train),
        features(x_val),
        labels(y_val),
        features(x_test),
        labels(y_test),
    )


# -- models ------------------------------------------------------------------------------
def make_mlp(n_in: int, hidden: int, n_out: int, depth: int = 1) -> nn.Sequential:
    """`depth` hidden ReLU layers of width `hidden`; the Linear layers are fc1, fc2, …"""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = n_in
    for i in range(depth):
        layers[f"fc{i + 1}"] = nn.Linear(width, hidden)
        layers[f"act{i + 1}"] = nn.ReLU()
        width = hidden
    layers[f"fc{depth + 1}"] = nn.Linear(width, n_out)
    return nn.Sequential(layers)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_budget(data: Dataset, hidden: int = SMALL_HIDDEN, depth: int = 1) -> int:
    """Parameters growth may add: half the static large model's count minus the small one's."""
    small = count_params(make_mlp(data.n_features, hidden, data.n_classes, depth))
    large = count_params(make_mlp(data.n_features, LARGE_FACTOR * hidden, data.n_classes, depth))
    return max(1, large // 2 - small)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        # counted in Python, not as a float32 mean, so equal counts give equal accuracies
        return int((model(x).argmax(1) == y).sum()) / len(y)
    finally:
        model.train(was_training)


# -- the server ----------------------------------------------------------------------------
def check_server(url: str, token: str) -> EsperClient:
    """A client for `url` once the server answers and accepts `token`; `SetupError` otherwise."""
    try:
        client = EsperClient(url, token, retries=2, timeout=10.0)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    try:
        client.request("GET", "blueprints/", params={"limit": 1})
    except RegistryUnavailable as exc:
        raise SetupError(
            f"cannot reach the Esper server at {client.base_url} ({exc.reason}); start it "
            "(`make serve`) or leave out --server to use the embedded default"
        ) from None
    except ApiError as exc:
        if exc.status in (401, 403):
            raise SetupError(
                f"the server at {client.base_url} refused the token ({exc.status} {exc.code}: "
                f"{exc.message}); create one with `python manage.py esper_token USER --create`"
            ) from None
        raise SetupError(f"the server at {client.base_url} answered {exc}") from None
    except KasminaError as exc:
        raise SetupError(f"{client.base_url} does not look like an Esper server: {exc}") from None
    return client


def list_policies(client: EsperClient) -> list[dict]:
    return client.request("GET", "policies/", params={"limit": 100})["results"]


def active_policy(client: EsperClient) -> dict | None:
    """The active trained policy version, or None (the server decides with the heuristic)."""
    try:
        return client.request("GET", "policies/active/")
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def activate_policy(client: EsperClient, version: int) -> dict:
    """`POST /policies/{version}/activate/` (staff tokens): decisions use that version next."""
    return client.request("POST", f"policies/{version}/activate/")


def request_policy_training(client: EsperClient, *, seed: int = 0) -> dict:
    """`POST /policies/train/`: `{"queued": True, "experiences": n, "known": versions}`, or
    `{"queued": False, "experiences": have, "needed": need}` when there are too few."""
    known = {v["version"] for v in list_policies(client)}
    try:
        answer = client.request("POST", "policies/train/", {"seed": seed})
    except ApiError as exc:
        if exc.code != "too_few_experiences":
            raise
        have = int((exc.detail or {}).get("experiences", 0))
        match = re.search(r"at least (\d+)", exc.message)
        return {"queued": False, "experiences": have, "needed": int(match[1]) if match else None}
    return {"queued": True, "experiences": answer.get("experiences"), "known": known}


def wait_for_policy(
    client: EsperClient,
    known: set[int],
    *,
    timeout: float = 300.0,
    poll: float = 1.0,
    on_poll: Callable[[float], None] | None = None,
) -> dict | None:
    """The first policy version not in `known` to appear in `GET /policies/`, or None."""
    start = time.monotonic()
    while (waited := time.monotonic() - start) < timeout:
        new = [v for v in list_policies(client) if v["version"] not in known]
        if new:
            return min(new, key=lambda v: v["version"])
        if on_poll is not None:
            on_poll(waited)
        time.sleep(poll)
    return None


def warm_registry(
    client: EsperClient,
    layers: Mapping[str, SeedLayer],
    *,
    dtype: str = "float32",
    timeout: float = 300.0,
    on_done: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Compile every active catalogue blueprint that fits each seed layer (`seed_layers` of a
    wrapped model), as a registry in use already has them: the kernel cache key
    makes later requests for them instant. Returns one row per kernel with its status and the
    seconds from request to a final status (the cold compile, queue wait included)."""
    blueprints = [b for b in client.list_blueprints(status="active")]
    wanted = []
    for name, layer in layers.items():
        for bp in blueprints:
            graft, layout = bp.ir.get("graft"), bp.ir.get("layout")
            if layout != layer.signature["layout"] or (
                graft != "residual" and layout != "features"
            ):
                continue
            try:
                wanted.append((name, bp, layer.seed_signature(graft, dtype)))
            except ValueError:  # a bridge blueprint, and this layer has no bridge source
                continue
    rows = []
    for layer, bp, signature in wanted:
        start = time.monotonic()
        try:
            info = client.request_kernel(bp.id, signature)
        except ApiError as exc:  # the compiler's limits refuse it at this width
            rows.append({"layer": layer, "blueprint": bp.name, "status": f"refused: {exc.code}"})
            continue
        rows.append(
            {"layer": layer, "blueprint": bp.name, "kernel": info.id, "start": start, "info": info}
        )
    for i, row in enumerate(rows):
        if "kernel" in row:
            info = row.pop("info")
            if not info.is_final:
                info = client.wait_for_kernel(row["kernel"], timeout=timeout, poll=0.1)
            row["status"] = info.status
            row["seconds"] = time.monotonic() - row.pop("start")
        if on_done is not None:
            on_done(i + 1, len(rows))
    return rows


_BLUEPRINT_NAMES: dict[str, dict[str, str]] = {}


def _blueprint_names(client: EsperClient) -> dict[str, str]:
    names = _BLUEPRINT_NAMES.get(client.base_url)
    if names is None:
        names = {b.id: b.name for b in client.list_blueprints()}
        _BLUEPRINT_NAMES[client.base_url] = names
    return names


# -- training ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Growth:
    """How a grown variant grows.

    `policy` is sent with every decision request: "heuristic" and "random" force those
    baselines; "gnn" (or None) uses the server's active trained policy, which is the
    heuristic until a trained version has been activated. `all_at_once=True` asks for no
    decisions: every seed site gets a `blueprint` kernel before the first step, trains for
    `training_steps`, blends in over `blend_steps` and is kept.

    The defaults are the growth benchmark's knobs, tuned on the validation split.
    """

    policy: str | None = "gnn"
    greedy: bool = False  # the policy's most likely action instead of a sample
    all_at_once: bool = False
    blueprint: str = "lowrank-adapter"
    seeds_per_layer: int = 2  # each Linear layer hosts two seeds
    target: tuple[str, ...] | None = None  # layer names; None: every nn.Linear
    decide_every: int = 10
    training_steps: int = 50
    blend_steps: int = 50
    probation_steps: int = 50
    embargo_steps: int = 100
    telemetry_every: int = 5
    param_budget: int | None = None
    spike_factor: float = 3.0  # the Controller's default
    poll_interval: float = 0.25


@dataclass
class RunResult:
    variant: str
    dataset: str
    seed: int
    test_accuracy: float
    val_accuracy: float
    params: int  # every parameter of the final model (kept and still-grafted seeds included)
    base_params: int
    wall_s: float
    epochs: int
    steps_per_epoch: int
    adaptations_made: int = 0
    adaptations_kept: int = 0
    adaptations_culled: int = 0
    adaptations_unfinished: int = 0
    rollbacks: int = 0
    losses: list[float] = field(default_factory=list)  # training loss of every step
    epoch_accuracy: list[float] = field(default_factory=list)  # validation accuracy per epoch
    markers: list[dict] = field(default_factory=list)  # one per adaptation
    policies: dict[str, int] = field(default_factory=dict)  # which policy decided the growth
    active_policy: str | None = None  # what "gnn" meant on the server when the run started
    cycle_s: list[float] = field(default_factory=list)  # decision → seed TRAINING, seconds
    max_step_s: float | None = None  # slowest controller.step() (or model.step())
    controller: dict | None = None  # controller.stats()

    def summary(self) -> dict:
        """Everything but the per-step and per-epoch series."""
        data = asdict(self)
        for key in ("losses", "epoch_accuracy"):
            data.pop(key)
        return data


def _markers_from_controller(controller, names: dict[str, str]) -> list[dict]:
    markers = []
    for row in controller.adaptations:
        steps = row.get("decision_to_training_steps")
        markers.append(
            {
                "decided_step": row["step"],
                "training_step": row["step"] + steps if steps is not None else None,
                "finished_step": row.get("finished_step"),
                "layer": row["layer"],
                "seed": row["seed"],
                "blueprint": names.get(str(row["blueprint"]), row["blueprint"]),
                "policy": row.get("policy"),
                "final_stage": row["final_stage"],
                "contribution": row["contribution"],
                "params_added": row["params_added"],
                "decision_to_training_s": row["decision_to_training_s"],
            }
        )
    return markers


class _AllAtOnce:
    """Every seed site gets a kernel of one blueprint before training starts (no decisions):
    requested from the registry, compiled by the worker, grafted by `load_kernel`, then
    TRAINING → BLENDING → PROBATION → FOSSILIZED on the same step counts as the Controller."""

    def __init__(self, model, client: EsperClient, optimizer, growth: Growth) -> None:
        self.model, self.growth = model, growth
        found = client.list_blueprints(name=growth.blueprint)
        if not found:
            raise SetupError(f"the registry has no blueprint named {growth.blueprint!r}")
        blueprint = max(found, key=lambda b: b.version)
        kernels = {}
        for name, layer in model.seed_layers.items():
            try:
                signature = layer.seed_signature(blueprint.ir["graft"])
            except ValueError:  # a bridge blueprint, and this layer has no bridge source
                continue
            kernels[name] = client.request_kernel(blueprint.id, signature).id
        for name, kernel in kernels.items():
            info = client.wait_for_kernel(kernel, timeout=300)
            if not info.is_ready:
                raise SetupError(
                    f"{growth.blueprint} kernel for layer {name} is {info.status}: {info.error}"
                )
        self.sites: dict[tuple[str, int], int] = {}
        for name, kernel in kernels.items():
            for idx in range(model.layer(name).num_seeds):
                model.load_kernel(name, idx, kernel, optimizer=optimizer)
                self.sites[(name, idx)] = 0
        self.params_before = {
            key: sum(p.numel() for p in model.seed_parameters(*key)) for key in self.sites
        }
        self.blueprint = blueprint.name

    def step(self, step: int) -> None:
        self.model.step()
        for (name, idx), since in self.sites.items():
            stage = self.model.layer(name).stages[idx]
            if stage is Stage.TRAINING and step - since >= self.growth.training_steps:
                self.model.advance(name, idx, Stage.BLENDING, "all at once: trained")
                self.sites[(name, idx)] = step
            elif stage is Stage.PROBATION:
                self.model.advance(name, idx, Stage.FOSSILIZED, "all at once: kept")

    def markers(self) -> list[dict]:
        out = []
        for (name, idx), _ in self.sites.items():
            stage = self.model.layer(name).stages[idx]
            out.append(
                {
                    "decided_step": 0,
                    "training_step": 0,
                    "finished_step": None,
                    "layer": name,
                    "seed": idx,
                    "blueprint": self.blueprint,
                    "policy": "all-at-once",
                    "final_stage": stage.name,
                    "contribution": None,
                    "params_added": sum(p.numel() for p in self.model.seed_parameters(name, idx)),
                    "decision_to_training_s": None,
                }
            )
        return out


def train(
    data: Dataset,
    *,
    hidden: int,
    variant: str,
    epochs: int = 40,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 32,
    depth: int = 1,
    growth: Growth | None = None,
    client: EsperClient | None = None,
    run_name: str | None = None,
    progress: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train one variant and measure it. `growth` needs `client` (an `EsperClient`)."""
    torch.manual_seed(seed)
    net = make_mlp(data.n_features, hidden, data.n_classes, depth)
    base_params = count_params(net)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    controller = everywhere = None
    active = None
    start = time.perf_counter()
    if growth is None:
        model = net
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        if client is None:
            raise ValueError("a grown variant needs an EsperClient")
        # Line one of the integration: the model's layers now host dormant seeds.
        model = wrap(
            net,
            target=list(growth.target) if growth.target else (nn.Linear,),
            seeds_per_layer=growth.seeds_per_layer,
            client=client,
            telemetry_every=growth.telemetry_every,
            blend_steps=growth.blend_steps,
            embargo_steps=growth.embargo_steps,
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        if growth.all_at_once:
            everywhere = _AllAtOnce(model, client, optimizer, growth)
        else:
            if growth.policy in (None, "gnn"):
                version = active_policy(client)
                active = f"gnn v{version['version']}" if version else "heuristic"
            # Line two: a Controller that asks Tamiyo where to grow and runs the lifecycles.
            controller = Controller(
                model,
                optimizer,
                client,
                run_name=run_name or f"{data.name}-{variant}-seed{seed}",
                total_steps=total_steps,
                decide_every=growth.decide_every,
                probation_steps=growth.probation_steps,
                training_steps=growth.training_steps,
                eval_fn=lambda: accuracy(model, data.x_val, data.y_val),
                param_budget=growth.param_budget,
                policy=growth.policy,
                greedy=growth.greedy,
                spike_factor=growth.spike_factor,
                poll_interval=growth.poll_interval,
            )
    losses: list[float] = []
    epoch_accuracy: list[float] = []
    max_step = 0.0
    step = 0
    try:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, batch_size):
                batch = order[i : i + batch_size]
                loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                losses.append(float(loss.detach()))
                if controller is not None or everywhere is not None:
                    t0 = time.perf_counter()
                    if controller is not None:
                        controller.step(loss)  # the researcher's one call per step
                    else:
                        everywhere.step(step)
                    max_step = max(max_step, time.perf_counter() - t0)
            val = accuracy(model, data.x_val, data.y_val)
            epoch_accuracy.append(val)
            epoch_loss = float(np.mean(losses[-steps_per_epoch:]))
            if controller is not None:
                controller.epoch_end({"accuracy": val, "loss": epoch_loss})
            if progress is not None:
                made = len(controller.adaptations) if controller is not None else 0
                kept = (
                    sum(r["final_stage"] == "FOSSILIZED" for r in controller.adaptations)
                    if controller is not None
                    else 0
                )
                if everywhere is not None:
                    made = len(everywhere.sites)
                    kept = sum(m["final_stage"] == "FOSSILIZED" for m in everywhere.markers())
                progress(
                    {
                        "epoch": epoch + 1,
                        "epochs": epochs,
                        "loss": epoch_loss,
                        "accuracy": val,
                        "made": made,
                        "kept": kept,
                    }
                )
        wall = time.perf_counter() - start
    finally:
        if controller is not None:
            controller.close()
    result = RunResult(
        variant=variant,
        dataset=data.name,
        seed=seed,
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        val_accuracy=epoch_accuracy[-1] if epoch_accuracy else float("nan"),
        params=count_params(model),
        base_params=base_params,
        wall_s=wall,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        losses=losses,
        epoch_accuracy=epoch_accuracy,
        max_step_s=max_step if growth is not None else None,
        active_policy=active,
    )
    if controller is not None:
        stats = controller.stats()
        result.controller = stats
        result.markers = _markers_from_controller(controller, _blueprint_names(client))
        result.rollbacks = stats["rollbacks"]
        result.policies = dict(Counter(str(m["policy"]) for m in result.markers))
        result.cycle_s = [
            m["decision_to_training_s"]
            for m in result.markers
            if m["decision_to_training_s"] is not None
        ]
    elif everywhere is not None:
        result.markers = everywhere.markers()
        result.policies = {"all-at-once": len(result.markers)}
    stages = Counter(m["final_stage"] for m in result.markers)
    result.adaptations_made = len(result.markers)
    result.adaptations_kept = stages.get("FOSSILIZED", 0)
    result.adaptations_culled = stages.get("CULLED", 0)
    result.adaptations_unfinished = result.adaptations_made - sum(
        stages.get(s, 0) for s in ("FOSSILIZED", "CULLED")
    )
    return result
