"""The host facts kasmina (runtime) and the server each write down agree."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import kasmina
from tezzeret.signature import DTYPES, GRAFTS, Signature, graft_dims


def test_the_server_sizes_every_graft_of_a_wrapped_model_as_the_runtime_does():
    model = kasmina.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    layers = list(model.seed_layers.values())
    assert len(layers) == 2 and any(layer.bridge_source is not None for layer in layers)
    for layer in layers:
        source = layer.bridge_source
        bridge_in = None if source is None else source.signature["in"]
        for graft in sorted(GRAFTS):
            server = graft_dims(graft, layer.signature["in"], layer.signature["out"], bridge_in)
            if server is None:
                with pytest.raises(ValueError, match="no bridge source"):
                    layer.graft_dims(graft)
            else:
                assert tuple(layer.graft_dims(graft)) == server, (layer, graft)


def test_the_server_dtypes_are_the_floating_dtypes_torch_names():
    torch_names = [
        str(d).removeprefix("torch.")
        for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    ]
    assert set(DTYPES) == set(torch_names) == {"float32", "float64", "bfloat16", "float16"}
    assert len(DTYPES) == len(set(DTYPES))


def test_an_unknown_graft_is_refused_by_name():
    with pytest.raises(ValueError, match="graft: must be one of"):
        graft_dims("sideways", 4, 8, None)


def test_a_seed_reads_the_hosts_output_only_for_a_residual_graft():
    assert Signature("residual", "features", 4, 8, "float32").width == 8
    assert Signature("parallel", "features", 4, 8, "float32").width == 4
    assert Signature("bridge", "features", 4, 8, "float32").width == 4


@pytest.mark.parametrize("first", ["tezzeret._resolve", "tezzeret.signature", "tezzeret.ir"])
def test_the_ir_modules_import_in_any_order(first):
    code = f"import {first}, tezzeret.ir as ir, tezzeret.signature as s; assert ir.Signature is s.Signature"
    subprocess.run([sys.executable, "-c", code], check=True)
