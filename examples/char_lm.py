"""Train a character-level language model on text that ships with Python, with fastlstm.

The corpus is the Zen of Python (``this``) followed by the docstrings of a few standard
library modules (``--corpus docs``, ~120 kB), or the Zen alone (``--corpus zen``, which the
model learns by heart). The text is cut into ``--batch`` parallel streams that are read in
chunks of ``--chunk`` characters with truncated backpropagation through time
(`fastlstm.train.truncated_bptt`): the LSTM state runs on from chunk to chunk, the gradient
stops at each chunk's start. Samples are printed before and after training.

    python examples/char_lm.py                  # 1.5 min on 2 cores (numpy backend)
    python examples/char_lm.py --steps 10000 --hidden 256

Writes the loss curve to a PNG (``--plot``).
"""

import argparse
import codecs
import contextlib
import importlib
import inspect
import io
import time

import numpy as np

import fastlstm
from fastlstm import train

DOC_MODULES = (
    "textwrap",
    "json",
    "argparse",
    "functools",
    "itertools",
    "collections",
    "heapq",
    "random",
    "statistics",
    "string",
    "shutil",
    "pathlib",
    "logging",
    "datetime",
    "calendar",
    "re",
    "os",
    "typing",
)


def zen_of_python():
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def module_docstrings(name):
    """The module's docstring and those of its own public functions and classes."""
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module) or ""]
    for attribute in sorted(dir(module)):
        value = getattr(module, attribute)
        if attribute.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
            continue
        if getattr(value, "__module__", None) == module.__name__ and inspect.getdoc(value):
            docs.append(inspect.getdoc(value))
    return docs


def corpus(kind):
    text = zen_of_python()
    if kind == "docs":
        text += "\n\n" + "\n\n".join(doc for name in DOC_MODULES for doc in module_docstrings(name))
    # Printable ASCII and newlines keep the vocabulary small (~95 symbols).
    return "".join(ch for ch in text if ch == "\n" or " " <= ch <= "~")


class Vocabulary:
    def __init__(self, text):
        self.symbols = sorted(set(text))
        self.index = {ch: i for i, ch in enumerate(self.symbols)}

    def __len__(self):
        return len(self.symbols)

    def encode(self, text):
        return np.array([self.index[ch] for ch in text], dtype=np.intp)

    def one_hot(self, codes, dtype=np.float32):
        return np.eye(len(self), dtype=dtype)[codes]


class CharModel:
    """One-hot characters -> stacked LSTM -> linear layer -> logits of the next character."""

    def __init__(self, vocab_size, hidden_size, num_layers, dropout, seed, backend=None):
        self.lstm = fastlstm.LSTM(
            vocab_size, hidden_size, num_layers, dropout=dropout, seed=seed, backend=backend
        )
        self.head = train.Linear(hidden_size, vocab_size, seed=seed + 1)

    def parameters(self):
        return {**self.lstm.parameters(), **self.head.parameters()}

    def sample(self, vocabulary, n_chars, prime="\n", temperature=0.8, seed=0):
        """Read ``prime``, then draw ``n_chars`` characters one `LSTM.step` at a time."""
        rng = np.random.default_rng(seed)
        state = self.lstm.initial_state(1)
        inputs = vocabulary.one_hot(vocabulary.encode(prime))[:, np.newaxis]
        for x_t in inputs:
            h_t, state = self.lstm.step(x_t, state)
        out = []
        for _ in range(n_chars):
            logits = self.head(h_t)[0].astype(np.float64) / temperature
            probabilities = np.exp(logits - logits.max())
            code = rng.choice(len(vocabulary), p=probabilities / probabilities.sum())
            out.append(vocabulary.symbols[code])
            h_t, state = self.lstm.step(vocabulary.one_hot([code]), state)
        return "".join(out)


def streams(codes, batch):
    """(T, batch) codes: the text cut into ``batch`` consecutive streams of equal length."""
    length = (len(codes) - 1) // batch
    inputs = codes[: batch * length].reshape(batch, length).T
    targets = codes[1 : batch * length + 1].reshape(batch, length).T
    return inputs, targets


def run(
    text,
    steps,
    hidden_size=128,
    num_layers=2,
    dropout=0.0,
    batch=32,
    chunk=64,
    lr=1e-2,
    seed=0,
    max_norm=5.0,
    backend=None,
    progress=None,
):
    """Train for ``steps`` chunks; returns (model, vocabulary, losses in nats per character)."""
    vocabulary = Vocabulary(text)
    model = CharModel(len(vocabulary), hidden_size, num_layers, dropout, seed, backend)
    optimizer = train.Adam(model.parameters(), lr=lr)
    inputs, targets = streams(vocabulary.encode(text), batch)
    x = vocabulary.one_hot(inputs)
    losses = []
    while len(losses) < steps:  # epochs: each runs the streams from their start
        for chunk_run in train.truncated_bptt(model.lstm, x, chunk, rng=seed):
            logits, head_cache = model.head.forward_train(chunk_run.y)
            chunk_targets = targets[chunk_run.start : chunk_run.stop]
            loss, d_logits = train.softmax_cross_entropy(logits, chunk_targets)
            head_grads = model.head.backward(d_logits, head_cache)
            grads = {**model.lstm.backward(head_grads.dx, chunk_run.cache), **head_grads}
            train.clip_grad_norm(grads, max_norm)
            optimizer.step(grads)
            losses.append(loss)
            if progress is not None:
                progress(len(losses) - 1, loss)
            if len(losses) == steps:
                break
    return model, vocabulary, losses


def plot(path, losses, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, lw=0.6, alpha=0.5, label="per chunk")
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"mean of {window}")
    ax.set(title=title, xlabel="step (chunk)", ylabel="cross-entropy (nats / char)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def backend_summary(backend):
    chosen = backend or "fastest per call of " + ", ".join(fastlstm.available_backends())
    return f"{chosen}, {fastlstm.get_num_threads()} thread(s)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=("docs", "zen"), default="docs")
    parser.add_argument("--steps", type=int, default=600, help="training chunks (default 600)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="stacked layers (default 2)")
    parser.add_argument("--dropout", type=float, default=0.0, help="between layers (default 0)")
    parser.add_argument("--batch", type=int, default=32, help="parallel streams (default 32)")
    parser.add_argument("--chunk", type=int, default=64, help="TBPTT chunk length (default 64)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=400, help="characters to sample")
    parser.add_argument("--threads", type=int, default=None, help="fastlstm.set_num_threads")
    parser.add_argument(
        "--backend", default=None, choices=fastlstm.available_backends(), help="default: fastest"
    )
    parser.add_argument("--plot", default="char_lm.png", help="PNG to write")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        fastlstm.set_num_threads(args.threads)
    text = corpus(args.corpus)
    bar = tqdm(total=args.steps, desc="training", unit="chunk")

    def progress(step, loss):
        bar.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    untrained = CharModel(len(Vocabulary(text)), args.hidden, args.layers, 0.0, args.seed)
    before = untrained.sample(Vocabulary(text), args.sample, seed=args.seed)
    start = time.perf_counter()
    model, vocabulary, losses = run(
        text,
        args.steps,
        args.hidden,
        args.layers,
        args.dropout,
        args.batch,
        args.chunk,
        args.lr,
        args.seed,
        backend=args.backend,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    bar.close()
    after = model.sample(vocabulary, args.sample, seed=args.seed)
    chunks_per_pass = -(-((len(text) - 1) // args.batch) // args.chunk)  # ceil
    plot(args.plot, losses, f"char LM on {len(text)} characters ({args.corpus})")
    print(f"\n--- sample before training ---\n{before}\n")
    print(f"--- sample after training ---\n{after}\n")
    print(f"corpus         {args.corpus}: {len(text)} characters, {len(vocabulary)} symbols")
    print(
        f"model          LSTM({len(vocabulary)}, {args.hidden}, {args.layers} layers) + "
        f"Linear({args.hidden}, {len(vocabulary)})"
    )
    print(f"backend        {backend_summary(args.backend)}")
    print(
        f"training       {args.steps} chunks of {args.batch}x{args.chunk} in {seconds:.1f} s "
        f"({1000 * seconds / max(args.steps, 1):.1f} ms/chunk, "
        f"{args.steps / chunks_per_pass:.1f} passes over the text)"
    )
    print(
        f"loss           first {losses[0]:.3f}, mean of last 50 {np.mean(losses[-50:]):.3f} "
        f"nats/char (uniform: {np.log(len(vocabulary)):.3f})"
    )
    print(f"plot           {args.plot}")


if __name__ == "__main__":
    main()
