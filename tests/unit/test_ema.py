import torch
from torch import nn

from selfflow.components.ema import EMA


def test_ema_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    assert all(not p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, s, p in zip(ema.model.parameters(), start, model.parameters()):
        assert torch.allclose(e, 0.9 * s + 0.1 * p.detach())
    ema.update(model)
    for e, s, p in zip(ema.model.parameters(), start, model.parameters()):
        expected = 0.9 * (0.9 * s + 0.1 * p) + 0.1 * p
        assert torch.allclose(e, expected.detach())
    assert ema.updates == 2


def test_ema_state_round_trip():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    ema.update(model)
    other = EMA(nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    for a, b in zip(ema.model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)
