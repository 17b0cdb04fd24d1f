"""Learn to continue a noisy sine wave with a fastlstm LSTM, then generate it free-running.

Each training sequence is a sine wave of random period (16 to 32 steps), phase and amplitude,
seen through measurement noise; the model reads it step by step and predicts the next clean
value (mean squared error). After training it is primed with the start of a new wave and then
fed its own predictions, one `LSTM.step` at a time.

    python examples/sequence_generation.py               # ~10-20 s on 2 cores
    python examples/sequence_generation.py --steps 3000 --hidden 64

Writes a PNG with the loss curve and a free-running generation (``--plot``).
"""

import argparse
import time

import numpy as np

import fastlstm
from fastlstm import train

PERIODS = (16.0, 32.0)
NOISE = 0.05


def sine_batch(rng, batch, length):
    """Clean waves (length, batch, 1): amplitude 0.5-1, period in PERIODS, random phase."""
    period = rng.uniform(*PERIODS, batch)
    phase = rng.uniform(0, 2 * np.pi, batch)
    amplitude = rng.uniform(0.5, 1.0, batch)
    steps = np.arange(length)[:, np.newaxis]
    return (amplitude * np.sin(2 * np.pi * steps / period + phase))[:, :, np.newaxis]


class SequenceModel:
    """An LSTM reading one value per step and a linear head predicting the next value."""

    def __init__(self, hidden_size, num_layers, seed, backend=None):
        self.lstm = fastlstm.LSTM(1, hidden_size, num_layers, seed=seed, backend=backend)
        self.head = train.Linear(hidden_size, 1, seed=seed + 1)

    def parameters(self):
        return {**self.lstm.parameters(), **self.head.parameters()}

    def train_step(self, inputs, targets, optimizer, max_norm):
        """One forward + backward + update; returns the loss before the update."""
        y, _, lstm_cache = self.lstm.forward_train(inputs)
        prediction, head_cache = self.head.forward_train(y)
        loss, d_prediction = train.mse_loss(prediction, targets)
        head_grads = self.head.backward(d_prediction, head_cache)
        grads = {**self.lstm.backward(head_grads.dx, lstm_cache), **head_grads}
        train.clip_grad_norm(grads, max_norm)
        optimizer.step(grads)
        return loss

    def generate(self, prefix, n_steps):
        """Read ``prefix`` (T, B, 1), then predict ``n_steps`` values feeding each one back."""
        state = self.lstm.initial_state(prefix.shape[1])
        for x_t in prefix:
            h_t, state = self.lstm.step(x_t, state)
        generated = np.empty((n_steps,) + prefix.shape[1:], prefix.dtype)
        for t in range(n_steps):
            generated[t] = self.head(h_t)
            h_t, state = self.lstm.step(generated[t], state)
        return generated


def run(
    steps=2000,
    hidden_size=32,
    num_layers=1,
    batch=32,
    length=64,
    lr=0.01,
    seed=0,
    max_norm=1.0,
    backend=None,
    progress=None,
):
    """Train from ``seed``; returns (model, losses). ``progress(step, loss)`` is called per step."""
    rng = np.random.default_rng(seed)
    model = SequenceModel(hidden_size, num_layers, seed, backend)
    optimizer = train.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        waves = sine_batch(rng, batch, length + 1)
        noisy = waves + NOISE * rng.standard_normal(waves.shape)
        inputs, targets = noisy[:-1].astype(np.float32), waves[1:].astype(np.float32)
        losses.append(model.train_step(inputs, targets, optimizer, max_norm))
        if progress is not None:
            progress(step, losses[-1])
    return model, losses


def free_running_error(model, seed, prime=48, n_steps=64, batch=16):
    """RMS error of generating ``n_steps`` after ``prime`` noisy steps of fresh waves."""
    rng = np.random.default_rng(seed + 1000)
    waves = sine_batch(rng, batch, prime + n_steps)
    noisy = (waves + NOISE * rng.standard_normal(waves.shape)).astype(np.float32)
    generated = model.generate(noisy[:prime], n_steps)
    return float(np.sqrt(np.mean((generated - waves[prime:]) ** 2))), noisy, waves, generated


def plot(path, losses, noisy, waves, generated, prime):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_wave) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.semilogy(losses, lw=0.8)
    ax_loss.set(title="training loss (MSE)", xlabel="step", ylabel="loss")
    steps = np.arange(len(waves))
    ax_wave.plot(steps, waves[:, 0, 0], color="0.6", label="true wave")
    ax_wave.plot(steps[:prime], noisy[:prime, 0, 0], ".", ms=3, label="noisy prefix (read)")
    ax_wave.plot(steps[prime:], generated[:, 0, 0], label="generated (free-running)")
    ax_wave.axvline(prime - 0.5, color="k", lw=0.5)
    ax_wave.set(title="continuation of a new wave", xlabel="step")
    ax_wave.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def backend_summary(backend):
    chosen = backend or "fastest per call of " + ", ".join(fastlstm.available_backends())
    return f"{chosen}, {fastlstm.get_num_threads()} thread(s)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    parser.add_argument("--layers", type=int, default=1, help="stacked layers (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="waves per step (default 32)")
    parser.add_argument("--length", type=int, default=64, help="steps per wave (default 64)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="fastlstm.set_num_threads")
    parser.add_argument(
        "--backend", default=None, choices=fastlstm.available_backends(), help="default: fastest"
    )
    parser.add_argument("--plot", default="sequence_generation.png", help="PNG to write")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        fastlstm.set_num_threads(args.threads)
    bar = tqdm(total=args.steps, desc="training", unit="step")

    def progress(step, loss):
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    start = time.perf_counter()
    model, losses = run(
        args.steps,
        args.hidden,
        args.layers,
        args.batch,
        args.length,
        args.lr,
        args.seed,
        backend=args.backend,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    bar.close()
    prime = 48
    rmse, noisy, waves, generated = free_running_error(model, args.seed, prime)
    plot(args.plot, losses, noisy, waves, generated, prime)
    print(f"\nbackend        {backend_summary(args.backend)}")
    print(
        f"model          LSTM(1, {args.hidden}, {args.layers} layer(s)) + Linear({args.hidden}, 1)"
    )
    print(
        f"training       {args.steps} steps of {args.batch}x{args.length} in {seconds:.1f} s "
        f"({1000 * seconds / max(args.steps, 1):.1f} ms/step)"
    )
    print(f"loss (MSE)     first {losses[0]:.4f}, mean of last 50 {np.mean(losses[-50:]):.5f}")
    print(f"free-running   RMS error {rmse:.3f} over 64 generated steps (amplitude 0.5-1)")
    print(f"plot           {args.plot}")


if __name__ == "__main__":
    main()
