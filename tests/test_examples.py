"""The examples in examples/ train: the sequence demo reaches a fixed loss from a fixed seed
within a bounded number of steps; the character model runs end to end and learns."""

import importlib.util
import pathlib

import numpy as np
import pytest

import fastlstm

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path} is not part of this installation")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sequence_demo_reaches_the_loss_threshold():
    """From seed 0, the mean MSE of 20 consecutive steps falls below 0.006 within 400 steps
    (it starts near 0.35; the input noise alone costs ~0.0015)."""
    demo = load_example("sequence_generation")
    model, losses = demo.run(steps=400, seed=0)
    running = np.convolve(losses, np.ones(20) / 20, mode="valid")
    assert losses[0] > 0.1
    assert running.min() < 0.006, f"best 20-step mean loss {running.min():.4f}"
    rmse, _, waves, generated = demo.free_running_error(model, seed=0)
    assert np.isfinite(rmse) and generated.shape == waves[48:].shape


def test_char_lm_runs_and_learns():
    demo = load_example("char_lm")
    text = demo.corpus("zen")
    assert text.startswith("The Zen of Python") and len(text) > 800
    model, vocabulary, losses = demo.run(
        text, steps=300, hidden_size=32, num_layers=2, dropout=0.1, batch=4, chunk=16, lr=1e-2
    )
    assert len(losses) == 300
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 1.0
    sample = model.sample(vocabulary, 50, prime="Beautiful")
    assert len(sample) == 50 and set(sample) <= set(vocabulary.symbols)


def test_benchmarked_training_steps_agree_with_torch():
    """The steps that benchmark_training.py times train alike: after three steps of each,
    fastlstm's weights (every backend) equal torch's."""
    pytest.importorskip("torch")
    bench = load_example("benchmark_training")
    weights, x, dy = bench.make_problem(6, 3, 5, 8, num_layers=2)
    torch_step, torch_weights = bench.torch_train_step(weights, x, dy, lr=0.01, train_bias_hh=False)
    for _ in range(3):
        torch_step()
    for backend in fastlstm.available_backends():
        step, current = bench.fastlstm_train_step(weights, x, dy, backend, lr=0.01)
        for _ in range(3):
            step()
        for ours, theirs in zip(current(), torch_weights()):
            for a, b in zip(ours, theirs):
                np.testing.assert_allclose(a, b, atol=2e-5)
