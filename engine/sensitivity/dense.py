"""The dense side of a sensitivity run, computed once and kept small.

- the windows (`hierui kld`'s: engine.kld.corpus.frame, the same BOS rule) and, per window, the dense model's head
  inputs at the scored positions (engine.kld.window.forward, as `hierui kld` gets them): the dense logits of a chunk
  are remade from them (the head applied), so no [positions, vocabulary] block is kept;
- every decoder layer's input over the whole window, for one layer at a time: engine.perturb.layerwise.
  capture_calibration with one window per chunk gives layer 0's input and the keyword arguments the model passes each
  layer (rotary embeddings, masks); `advance()` runs dense layer ℓ over the cached input of layer ℓ, which then holds
  layer ℓ + 1's. Memory: windows × ctx × hidden (twice: layer 0's input is kept to start each level again), never ×
  layers.
"""

from __future__ import annotations

from engine.errors import HieruiError

# the dense log-probabilities of every scored position are kept when they take at most this (float32): a unit then
# reads them instead of remaking them (the head and its log-softmax, about a tenth of a forward on a small model)
KEPT_BYTES = 1 << 30


class DenseSide:
    """The dense model's side of every window (see the module docstring). `run`: the KldRun frame of the corpus
    (engine.kld.corpus.frame: windows, scored positions, targets)."""

    def __init__(self, loaded, run, progress=None):
        import torch

        from engine.anatomy.linears import decoder_layers
        from engine.kld.window import Head, forward
        from engine.perturb.layerwise import capture_calibration

        say = progress or (lambda *_: None)
        model = loaded.model
        self.model = model
        self.layers = decoder_layers(model)
        self.run = run
        self.m = len(run.positions) // max(1, run.windows)
        device = loaded.device
        rows = []
        for start in run.starts:
            window = list(run.ids[start : start + run.ctx])
            if run.bos is not None:
                window[0] = run.bos
            rows.append(window)
        self.ids = torch.tensor(rows, dtype=torch.long, device=device)
        self.targets = self.ids[:, run.ctx - self.m :]
        head = Head.of(model)
        self.head_in = []
        say("sensitivity: dense windows", 0, len(rows))
        for w in range(len(rows)):
            window = forward(model, self.ids[w : w + 1], self.m, head)
            if window.head is None:
                raise HieruiError(
                    f"{type(model).__name__}: its logits are not its output head applied to its last hidden state "
                    "(a logit scale, say), which hierui sensitivity needs; use hierui kld per spec instead"
                )
            head = window.head
            self.head_in.append(window.head_in)
            say("sensitivity: dense windows", w + 1, len(rows))
        self.head = head
        first, self.kwargs = capture_calibration(model, self.ids, batch_size=1)
        self.first = first  # layer 0's input per window (1, ctx, H)
        self.hidden = list(first)  # the input of layer `self.layer` per window
        self.layer = 0
        self.tuple_out = False  # the decoder layers return a tuple (hidden, …) rather than the tensor
        self.kept: list | None = None  # per window, (lo, hi) → dense_side without "p" (keep_sides)
        self.keep_sides()

    @property
    def windows(self) -> int:
        return len(self.head_in)

    def restart(self) -> None:
        """Back to layer 0's inputs (a new level)."""
        self.hidden = list(self.first)
        self.layer = 0

    def advance(self) -> None:
        """The cached inputs become those of the next layer: dense layer ℓ run over each window."""
        import torch
        from accelerate.utils import send_to_device

        from engine.place.streaming import layer_device

        layer = self.layers[self.layer]
        device = layer_device(layer)
        with torch.no_grad():
            for w, h in enumerate(self.hidden):
                out = layer(h.to(device), **send_to_device(self.kwargs[self.layer][w], device))
                self.tuple_out = isinstance(out, (tuple, list))
                self.hidden[w] = out[0] if self.tuple_out else out
        self.layer += 1

    def dense_logits(self, w: int, lo: int, hi: int):
        """The dense float32 logits of window w's scored positions lo … hi − 1 (the head applied to its inputs)."""
        return self.head(self.head_in[w][lo:hi])

    def side(self, w: int, lo: int, hi: int) -> dict:
        """engine.kld.window.dense_side of window w's scored positions lo … hi − 1: from the cache where the run's
        log-probabilities fit KEPT_BYTES (its probabilities made again, lp.exp(), as dense_side makes them: the
        same numbers), else made from the head's inputs."""
        from engine.kld.window import dense_side

        if self.kept is None:
            return dense_side(self.dense_logits(w, lo, hi), self.targets[w, lo:hi])
        found = dict(self.kept[w][(lo, hi)])
        found["p"] = found["lp"].exp()
        return found

    def keep_sides(self) -> None:
        """Keep every window's dense log-probabilities (and NLL, top-1) where they fit KEPT_BYTES: each unit then
        reads them instead of applying the dense head and its log-softmax again."""
        from engine.kld.window import chunks, dense_side

        if self.windows * self.m * self.head.vocab * 4 > KEPT_BYTES:
            return
        kept = []
        for w in range(self.windows):
            parts = {}
            for lo, hi in chunks(self.m, self.head.vocab):
                d = dense_side(self.dense_logits(w, lo, hi), self.targets[w, lo:hi])
                del d["p"]
                parts[(lo, hi)] = d
            kept.append(parts)
        self.kept = kept
