"""A plain PyTorch training loop on digits, plus the two lines that let Esper grow the model.

    make serve            # in another terminal: prints an API token, serves on :8000
    ESPER_URL=http://127.0.0.1:8000 ESPER_TOKEN=<token> .venv/bin/python examples/two_lines.py

Everything else is the loop you already have.
"""

import os
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

from kasmina import EsperClient, wrap
from kasmina.controller import Controller  # also `from kasmina import Controller`

if not (os.environ.get("ESPER_URL") and os.environ.get("ESPER_TOKEN")):
    sys.exit(
        "set ESPER_URL and ESPER_TOKEN: `make serve` prints a token and serves "
        "http://127.0.0.1:8000 (or run `make demo`, which starts a server itself)"
    )

x, y = load_digits(return_X_y=True)
x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)
y = torch.tensor(y)
torch.manual_seed(0)
epochs, batch_size = 30, 32

model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
model = wrap(model, client=EsperClient())  # ESPER line 1: every Linear hosts a dormant seed
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
controller = Controller(  # ESPER line 2: Tamiyo decides where to grow
    model, optimizer, EsperClient(), total_steps=epochs * -(-len(x) // batch_size)
)

for _ in range(epochs):
    for idx in torch.randperm(len(x)).split(batch_size):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        controller.step(loss)  # ESPER (line 2, continued): once per step, never blocks

controller.close()
stats = controller.stats()
print(
    f"trained {stats['steps']} steps; {stats['decisions']} decisions, "
    f"{stats['germinated']} seeds grown, {stats['fossilized']} kept; run {stats['run']}"
)
for row in controller.adaptations:
    print(f"  step {row['step']}: {row['layer']}[{row['seed']}] -> {row['final_stage']}")
