import pytest
import torch
from pydantic import TypeAdapter

from darkknowledge.config import ModelConfig
from darkknowledge.models import MLP
from darkknowledge.registry import MODELS, build_model

CONFIGS = [
    {"name": "mlp", "hidden": [32, 16], "dropout": 0.1, "max_norm": 2.0},
    {"name": "lenet5"},
    {"name": "small_cnn", "width": 4},
    {"name": "small_resnet", "width": 4, "blocks": [1, 1, 1]},
]


def test_every_config_name_has_a_builder():
    names = {c["name"] for c in CONFIGS}
    assert names == set(MODELS.names())


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["name"] for c in CONFIGS])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_forward_shapes(cfg, shape):
    model = build_model(TypeAdapter(ModelConfig).validate_python(cfg), shape, 10)
    out = model(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    out.sum().backward()


def test_max_norm_constraint():
    m = MLP((1, 4, 4), 3, hidden=[8], max_norm=0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(100)
    m.apply_constraints()
    for layer in m.net:
        if isinstance(layer, torch.nn.Linear):
            assert float(layer.weight.detach().norm(dim=1).max()) <= 0.5 + 1e-5
