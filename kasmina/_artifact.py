"""Load a kernel archive (``.pt2``) into a trainable module whose ``.train()``/``.eval()`` work.

``torch.export.load`` falls back to ``torch.load(weights_only=False)`` and ``pickle.loads``
for payloads an archive marks as pickled, and for a non-empty sample-inputs blob. Our
archives contain none of those, so `load_kernel` refuses any archive that does before
``torch.export.load`` sees it. (The runtime also checks the sha256 first.)

``ExportedProgram.module()`` returns a GraphModule whose ``train``/``eval`` raise
``NotImplementedError`` (torch 2.13), with the training flags of dropout and batch norm
baked into the graph. We replace those ops by stateless submodules that read
``self.training``; parameters, buffers and ``state_dict`` keys are unchanged.

torch's per-call input validation costs ~0.1 ms of Python per call (about 3x a small
kernel's own forward); it is swapped for an equivalent rank-and-static-dims check.
"""

from __future__ import annotations

import io
import json
import operator
import re
import zipfile

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["KernelLoadError", "load_kernel"]

MAX_ARCHIVE_BYTES = 128 * 2**20
_ALLOWED_NAMES = re.compile(
    r"^archive/("
    r"data/weights/weight_\d+|data/constants/tensor_constant_?\d+|"
    r"data/weights/model_weights_config\.json|data/constants/model_constants_config\.json|"
    r"models/model\.json|data/sample_inputs/model\.pt|"
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r")$"
)
_CONFIGS = (
    "archive/data/weights/model_weights_config.json",
    "archive/data/constants/model_constants_config.json",
)
_MODE_OPS = ("dropout", "batch_norm", "bernoulli")  # name fragments of train/eval-dependent ops


class KernelLoadError(ValueError):
    """The bytes are not a kernel archive this loader accepts."""


def _check_archive(artifact: bytes) -> None:
    try:
        archive = zipfile.ZipFile(io.BytesIO(artifact))
    except zipfile.BadZipFile as exc:
        raise KernelLoadError(f"not a .pt2 (zip) archive: {exc}") from None
    with archive:
        infos = archive.infolist()
        for info in infos:
            if not _ALLOWED_NAMES.match(info.filename):
                raise KernelLoadError(
                    f"unexpected archive member {info.filename!r}; recompile the kernel"
                )
        if sum(info.file_size for info in infos) > MAX_ARCHIVE_BYTES:
            raise KernelLoadError(f"archive expands beyond {MAX_ARCHIVE_BYTES} bytes")
        names = {info.filename for info in infos}
        for config_name in _CONFIGS:
            if config_name not in names:
                raise KernelLoadError(f"archive lacks {config_name!r}")
            try:
                config = json.loads(archive.read(config_name))["config"]
            except (ValueError, KeyError, TypeError) as exc:
                raise KernelLoadError(f"unreadable {config_name!r}: {exc}") from None
            for fqn, meta in config.items():
                if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                    raise KernelLoadError(
                        f"payload {fqn!r} is pickled; pickled payloads are refused"
                    )
        sample = "archive/data/sample_inputs/model.pt"
        if sample in names and archive.getinfo(sample).file_size:
            raise KernelLoadError("archive carries pickled sample inputs; they are refused")


class _ModeDropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, self.training)


class _ModeBatchNorm(nn.Module):
    def __init__(self, momentum: float, eps: float) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps

    def forward(self, x, weight, bias, running_mean, running_var):  # noqa: ANN001, ANN201
        return F.batch_norm(
            x, running_mean, running_var, weight, bias, self.training, self.momentum, self.eps
        )


class _ModeCounter(nn.Module):
    """``num_batches_tracked += 1`` only in training, as ``nn.BatchNorm`` does."""

    def forward(self, counter: torch.Tensor) -> torch.Tensor:
        return counter.add_(1) if self.training else counter


def _is_batch_counter(node: object) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "get_attr"
        and str(node.target).endswith("num_batches_tracked")
    )


def _make_mode_aware(gm: fx.GraphModule) -> None:
    aten = torch.ops.aten
    graph = gm.graph
    for i, node in enumerate(list(graph.nodes)):
        if node.op != "call_function":
            continue
        if node.target is aten.dropout.default and len(node.args) == 3 and not node.kwargs:
            module, args = _ModeDropout(node.args[1]), node.args[:1]
        elif node.target is aten.batch_norm.default and len(node.args) == 9 and not node.kwargs:
            x, w, b, mean, var, _training, momentum, eps, _cudnn = node.args
            module, args = _ModeBatchNorm(momentum, eps), (x, w, b, mean, var)
        elif (
            node.target is aten.add_.Tensor
            and _is_batch_counter(node.args[0])
            and node.args[1:] == (1,)
        ):
            module, args = _ModeCounter(), node.args[:1]
        else:
            continue
        name = f"_esper_mode_{i}"
        gm.add_submodule(name, module)
        with graph.inserting_before(node):
            replacement = graph.call_module(name, args)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "call_function":
            target = node.target
            allowed = target is operator.getitem or (
                isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
            )
            if not allowed:
                raise KernelLoadError(f"graph calls {target!r}, which kernels may not call")
            if any(fragment in str(target) for fragment in _MODE_OPS):
                raise KernelLoadError(
                    f"graph has {target} whose train/eval behaviour cannot be switched"
                )
        elif node.op in ("call_method",):
            raise KernelLoadError(f"graph calls method {node.target!r}, which kernels may not call")
    graph.lint()
    gm.recompile()
    # ExportedProgram.module() pins raising train/eval onto the instance; drop them.
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)


class _InputGuard:
    """Cheap stand-in for torch's per-call input validation (~0.1 ms of Python per call).

    Checks what torch's check does for our single-tensor kernels: rank and static (width)
    dims. Like torch, not the dtype, so autocast still works.
    """

    def __init__(self, shape: tuple[int | None, ...]) -> None:
        self.shape = shape

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if len(args) == 1 else None
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != len(self.shape)
            or any(
                want is not None and got != want
                for got, want in zip(x.shape, self.shape, strict=True)
            )
        ):
            want = ", ".join("*" if d is None else str(d) for d in self.shape)
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"{len(args)} args"
            raise RuntimeError(f"kernel expects one tensor of shape [{want}], got {got}")


def _install_input_guard(gm: fx.GraphModule) -> None:
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    val = placeholders[0].meta.get("val") if len(placeholders) == 1 else None
    if not isinstance(val, torch.Tensor) or not hasattr(gm, "validate_inputs"):
        return  # keep torch's own validation
    gm.register_forward_pre_hook(
        _InputGuard(tuple(d if isinstance(d, int) else None for d in val.shape))
    )
    gm.validate_inputs = False


def load_kernel(artifact: bytes) -> nn.Module:
    """Deserialise a kernel archive into a trainable module (in train mode).

    Verify ``artifact_sha256`` before calling this. Raises `KernelLoadError`.
    """
    _check_archive(artifact)
    try:
        program = torch.export.load(io.BytesIO(artifact))
    except Exception as exc:
        raise KernelLoadError(f"torch.export.load failed: {type(exc).__name__}: {exc}") from exc
    module = program.module()
    _make_mode_aware(module)
    _install_input_guard(module)
    module.train()
    return module
