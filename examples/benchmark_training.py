"""Time one training step (forward + backward + Adam) of a stacked LSTM: fastlstm vs PyTorch.

Both sides train the same model from the same weights on the same threads: the layer's
forward_train / backward and `fastlstm.train.Adam` against ``torch.nn.LSTM``, ``backward``
and ``torch.optim.Adam``. The upstream gradient of the output is a fixed random array (the
loss head is left out: it is the same work on both sides). Default shape: S3 of DESIGN.md,
T=50, B=32, D=128, H=256, two layers, float32.

    python examples/benchmark_training.py                     # every backend + torch
    python examples/benchmark_training.py --threads 1 --repeats 50 --layers 1

Prints the median time per step of each implementation (measured interleaved, round by
round, so that load from other processes hits them alike) and the speed-up over torch.
"""

import argparse
import time

import numpy as np

import fastlstm
from fastlstm import train


def make_problem(T, B, D, H, num_layers, seed=0):
    """A layer's weights, an input and an upstream gradient, float32."""
    rng = np.random.default_rng(seed)
    layer = fastlstm.LSTM(D, H, num_layers, seed=seed)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    return layer.weights, x, dy


def fastlstm_train_step(weights, x, dy, backend, lr=1e-3):
    """``(step, current_weights)``: step() runs forward_train, backward and Adam on a fresh
    copy of ``weights``; current_weights() returns them in fastlstm's layout."""
    layer = fastlstm.LSTM.from_weights(weights, backend=backend)
    optimizer = train.Adam(layer.parameters(), lr=lr)

    def step():
        _, _, cache = layer.forward_train(x)
        # No input gradient: torch computes none either (its x does not require grad).
        optimizer.step(layer.backward(dy, cache, need_dx=False))

    return step, lambda: layer.weights


def torch_train_step(weights, x, dy, lr=1e-3, train_bias_hh=True):
    """The same step in PyTorch: ``nn.LSTM`` from ``weights``, ``backward``, ``optim.Adam``;
    returns ``(step, current_weights)`` as `fastlstm_train_step`.

    torch's LSTM has two biases per layer where ours has one (their sum); Adam moves each,
    so the sum moves twice as far. ``train_bias_hh=False`` freezes the second one (at zero)
    to follow the same trajectory as fastlstm.
    """
    import torch

    H = weights[0][1].shape[0]
    module = torch.nn.LSTM(x.shape[2], H, len(weights))
    state = {}
    for k, (Wx, Wh, b) in enumerate(weights):
        to_torch = lambda w: torch.from_numpy(_torch_gates(np.asarray(w)).T.copy())
        state[f"weight_ih_l{k}"] = to_torch(Wx)
        state[f"weight_hh_l{k}"] = to_torch(Wh)
        state[f"bias_ih_l{k}"] = to_torch(b)
        state[f"bias_hh_l{k}"] = torch.zeros(4 * H)
    module.load_state_dict(state)
    for k in range(len(weights)):
        getattr(module, f"bias_hh_l{k}").requires_grad_(train_bias_hh)
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=lr)
    x_t, dy_t = torch.from_numpy(x), torch.from_numpy(dy)

    def step():
        optimizer.zero_grad(set_to_none=True)
        y, _ = module(x_t)
        y.backward(dy_t)
        optimizer.step()

    return step, lambda: fastlstm.LSTM.from_torch(module).weights


def _torch_gates(array):
    """Gate blocks i, f, o, g (ours) to i, f, g, o (torch), along the last axis."""
    i, f, o, g = np.split(array, 4, axis=-1)
    return np.concatenate([i, f, g, o], axis=-1)


def time_steps(steps, repeats, warmup=3):
    """Seconds per call of each callable in ``steps`` (name -> step), called interleaved:
    name -> (median, minimum)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs=4, default=(50, 32, 128, 256), metavar=("T", "B", "D", "H")
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--backends",
        nargs="*",
        default=None,
        help="fastlstm backends (default: every available one)",
    )
    args = parser.parse_args(argv)
    weights, x, dy = make_problem(*args.shape, args.layers)
    fastlstm.set_num_threads(args.threads)
    steps = {}
    for backend in args.backends or fastlstm.available_backends():
        steps[f"fastlstm[{backend}]"] = fastlstm_train_step(weights, x, dy, backend)[0]
    try:
        import torch
    except ImportError:
        print("torch is not installed: timing fastlstm only")
    else:
        torch.set_num_threads(args.threads)
        steps["torch"] = torch_train_step(weights, x, dy)[0]
    medians = time_steps(steps, args.repeats)
    T, B, D, H = args.shape
    print(
        f"training step (forward + backward + Adam), {args.layers}-layer LSTM, T={T} B={B} "
        f"D={D} H={H} float32, {args.threads} thread(s), {args.repeats} interleaved repeats"
    )
    print(f"  {'':18s} {'median':>9s}    {'min':>9s}")
    for name, (median, best) in medians.items():
        line = f"  {name:18s} {1000 * median:9.2f} ms {1000 * best:9.2f} ms"
        if "torch" in medians and name != "torch":
            torch_median, torch_best = medians["torch"]
            line += (
                f"   {torch_median / median:5.2f}x torch (median), {torch_best / best:5.2f}x (min)"
            )
        print(line)


if __name__ == "__main__":
    main()
