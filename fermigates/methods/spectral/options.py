"""``SpectralOptions``: the options of ``FermiConfig(method="spectral", method_options=...)``."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.options import Options, option

#: how the eigenvalue sets that judge a shared node are combined (see ``SpectralOptions.link_mode``)
LINK_MODES = ("and", "or", "mean")


@dataclass
class SpectralOptions(Options):
    """Which parts of a spectral layer train, how a pretrained layer is written in spectral form, and how shared
    nodes are judged. Every field carries its help text in ``metadata``."""

    train_base: bool = option(
        "Train the eigenvector block phi (the 'base', stored under the layer's 'weight' key). Off by default: "
        "with phi trained too its rows absorb the scale the eigenvalues would carry, and the eigenvalues stop "
        "ranking the nodes (the seed trains it; spectral_distill turns it on after pruning).",
        default=False,
    )
    train_start: bool = option(
        "Train the start-node eigenvalues (one per input feature). Off by default, as in the seed: they start at "
        "0, and a non-zero start eigenvalue shifts the factor of every outgoing weight of its node by the same "
        "amount, mixing it with the end eigenvalues of the next nodes instead of scaling the node.",
        default=False,
    )
    train_end: bool = option(
        "Train the end-node eigenvalues (one per output feature): each scales its node's incoming weights, "
        "and their magnitudes rank the nodes. On by default (the papers' eigenvalue-only training).",
        default=True,
    )
    train_bias: bool = option(
        "Train the biases of the spectral layers. Off by default, so that eigenvalue-only training moves "
        "nothing but eigenvalues.",
        default=False,
    )
    train_rest: bool = option(
        "Train the parameters of everything that is not a spectral layer (norms, embeddings, layers left "
        "unconverted). Off by default (eigenvalue-only training).",
        default=False,
    )
    l1: float = option(
        "Weight of an L1 penalty on the eigenvalues that judge nodes (each over the magnitude it started from), "
        "added to the loss by the method's optimizer (sparsity_loss). 0 (default) is the papers' training. On a "
        "pretrained network distilled toward itself the loss and its gradient start at 0, so without it "
        "eigenvalue-only training has nothing to learn from: the penalty pulls the eigenvalues of nodes the output does not "
        "need toward 0, and the distillation holds up those it does.",
        default=0.0,
    )
    normalize: bool = option(
        "Write a pretrained layer with unit-norm eigenvector rows and end eigenvalues equal to the rows' norms "
        "(|lambda_end| then starts as the node's incoming-weight norm); False: phi = -W and every end eigenvalue "
        "1 (the seed's initialisation: every node starts equal, only training orders them). Either way the "
        "converted layer computes the original function.",
        default=True,
    )
    link_mode: str = option(
        "How the eigenvalue sets that judge one node are combined (a node shared by two spectral layers: the "
        "end eigenvalues of its producer and, when they train, the start eigenvalues of its consumer; several "
        "producers of one node): 'and' keeps a node only when every set ranks it high (the smallest normalised "
        "|lambda|, the seed's default), 'or' when any does (the largest), 'mean' their mean.",
        default="and",
    )

    what = "method_options"

    def validate(self) -> None:
        for name in ("train_base", "train_start", "train_end", "train_bias", "train_rest", "normalize"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if isinstance(self.l1, bool) or not isinstance(self.l1, (int, float)) or not self.l1 >= 0:
            raise ValueError(f"l1 must be a number >= 0, got {self.l1!r}")
        if self.link_mode not in LINK_MODES:
            raise ValueError(f"link_mode must be one of {LINK_MODES}, got {self.link_mode!r}")

    def parts(self) -> dict[str, bool]:
        """Which parts train: ``{"base", "start", "end", "bias", "rest"} -> bool``."""
        return {"base": self.train_base, "start": self.train_start, "end": self.train_end,
                "bias": self.train_bias, "rest": self.train_rest}
