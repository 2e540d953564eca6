"""Divergence detector: quiet on a falling loss, fires on a sustained spike, resumes from its state."""

import math

from tokenmill.train.stability import DivergenceDetector


def make() -> DivergenceDetector:
    return DivergenceDetector(threshold=1.0, fast_alpha=0.1, slow_alpha=0.01, warmup_steps=5)


def test_quiet_on_a_falling_loss_and_ignores_nan():
    det = make()
    assert not any(det.update(8.0 - 0.01 * i) for i in range(200))
    assert not det.update(math.nan)


def test_fires_on_a_sustained_spike():
    det = make()
    for _ in range(50):
        assert not det.update(3.0)
    fired = [det.update(9.0) for _ in range(10)]
    assert fired[-1] and not fired[0]


def test_one_isolated_spike_does_not_fire():
    det = make()
    for _ in range(50):
        det.update(3.0)
    assert not det.update(9.0)
    assert not any(det.update(3.0) for _ in range(20))


def test_warmup_steps_hold_it_back():
    det = DivergenceDetector(threshold=1.0, fast_alpha=1.0, slow_alpha=0.01, warmup_steps=5)
    assert not det.update(3.0)
    assert not det.update(30.0)  # within warmup


def test_state_round_trip_continues_identically():
    a, b = make(), make()
    for loss in (5.0, 4.0, 3.5):
        a.update(loss)
    b.load_state_dict(a.state_dict())
    for loss in (3.0, 9.0, 9.0, 9.0):
        assert a.update(loss) == b.update(loss)
    assert a.state_dict() == b.state_dict()
